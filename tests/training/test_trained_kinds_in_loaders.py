"""What ComfyUI's and A1111's loaders make of the kohya file a `--kind` run writes: per module, the weight each
computes from the file's tensors equals the weight the trained layer computes with (rtol 1e-5).

Neither UI installs here (ComfyUI needs its model management, A1111 its whole web UI), so their weight computations
are restated below, line for line in what they compute, at weight (strength, multiplier) 1 and in fp32:

- ComfyUI, comfy/weight_adapter/ (commit 9c0cf36 of comfyanonymous/ComfyUI): `lora.py`, `loha.py`, `lokr.py`
  `calculate_weight` and `base.py` `weight_decompose`; comfy/lora.py reads `{name}.alpha` and `{name}.dora_scale`.
- A1111, extensions-builtin/Lora/ (AUTOMATIC1111/stable-diffusion-webui 1.10): `network_lora.py`, `network_hada.py`,
  `network_lokr.py` `calc_updown`, `lyco_helpers.py`, and `network.py` `finalize_updown` with
  `apply_weight_decompose` (DoRA, added by A1111 PR #15160).

ComfyUI's LoKr cannot apply a Tucker 3x3 conv: `lokr.py` passes the einsum-rebuilt second half to torch.kron
without making it contiguous (A1111's `make_kron` and LyCORIS do), torch.kron refuses its layout, and ComfyUI
logs the error and leaves the layer as it was; the test expects exactly that, and the run says so.

DoRA with its magnitude per output row (peft's, `--dora-axis output`) is left out on purpose: ComfyUI's output-axis
branch divides by the norm of W instead of W + dW (an open bug, Comfy-Org/ComfyUI PR #15458) and A1111 reads every
magnitude per input column; `test_dora_per_output_row_is_what_those_loaders_apply_inexactly` shows the difference,
and the run says so (`outputs.loader_notes`). `--dora-axis input` is what both apply exactly.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdlora.core.families import SD1
from sdlora.core.files import write_kohya
from sdlora.training import network

RANK, ALPHA, CONV_RANK, CONV_ALPHA = 4, 6.0, 2, 3.0  # alpha != rank; the 3x3 convs at their own rank and alpha


# ---------------------------------------------------------------- ComfyUI, restated


def _norm_per_input_column(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column over the other axes, shaped [1, in, 1, ...]: the expression ComfyUI's
    `weight_decompose` (its input-axis branch) and A1111's `apply_weight_decompose` both compute."""
    columns = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1, keepdim=True)
    return columns.reshape(weight.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)


def _comfy_weight_decompose(dora_scale, weight, lora_diff, alpha):
    """comfy/weight_adapter/base.py `weight_decompose` at strength 1."""
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:  # its output-axis branch: the norm of W, not of W + dW
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        weight_norm = _norm_per_input_column(weight_calc)
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    return weight_calc * (dora_scale / weight_norm)


def comfyui_weight(t: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The weight ComfyUI's LoRA/LoHa/LoKr adapters compute for one module's tensors `t` (names without prefix)."""
    alpha_value = t["alpha"].item() if "alpha" in t else None
    dora_scale = t.get("dora_scale")
    if "lora_up.weight" in t:  # lora.py
        mat1, mat2 = t["lora_up.weight"], t["lora_down.weight"]
        alpha = alpha_value / mat2.shape[0] if alpha_value is not None else 1.0
        if "lora_mid.weight" in t:
            mat3 = t["lora_mid.weight"]
            final_shape = [mat2.shape[1], mat2.shape[0], mat3.shape[2], mat3.shape[3]]
            mat2 = torch.mm(mat2.transpose(0, 1).flatten(start_dim=1), mat3.transpose(0, 1).flatten(start_dim=1))
            mat2 = mat2.reshape(final_shape).transpose(0, 1)
        diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
    elif "hada_w1_a" in t:  # loha.py
        w1a, w1b, w2a, w2b = t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"]
        alpha = alpha_value / w1b.shape[0] if alpha_value is not None else 1.0
        if "hada_t1" in t:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"], w1b, w1a)
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"], w2b, w2a)
        else:
            m1, m2 = torch.mm(w1a, w1b), torch.mm(w2a, w2b)
        diff = (m1 * m2).reshape(weight.shape)
    else:  # lokr.py
        dim = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            dim = t["lokr_w1_b"].shape[0]
            w1 = torch.mm(t["lokr_w1_a"], t["lokr_w1_b"])
        w2 = t.get("lokr_w2")
        if w2 is None:
            dim = t["lokr_w2_b"].shape[0]
            if "lokr_t2" in t:
                w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
            else:
                w2 = torch.mm(t["lokr_w2_a"], t["lokr_w2_b"])
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        alpha = alpha_value / dim if alpha_value is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2).reshape(weight.shape)
    if dora_scale is not None:
        return _comfy_weight_decompose(dora_scale, weight, diff, alpha)
    return weight + alpha * diff


# ---------------------------------------------------------------- A1111, restated


def _a1111_make_weight_cp(t, wa, wb):  # lyco_helpers.make_weight_cp
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def _a1111_rebuild_conventional(up, down, shape):  # lyco_helpers.rebuild_conventional (no dyn_dim)
    return (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)


def a1111_weight(t: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The weight A1111's built-in Lora extension computes (orig + updown) for one module's tensors `t`."""
    dim = None
    if "lora_up.weight" in t:  # network_lora.py; create_module shapes up/down as the layer's Linear or Conv2d
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        if weight.dim() == 2:
            up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        dim = down.shape[0]
        output_shape = [up.size(0), down.size(1)]
        if "lora_mid.weight" in t:
            mid = t["lora_mid.weight"]
            updown = torch.einsum("n m k l, i n, m j -> i j k l", mid, up.reshape(up.size(0), -1), down.reshape(down.size(0), -1))
            output_shape += mid.shape[2:]
        else:
            if len(down.shape) == 4:
                output_shape += down.shape[2:]
            updown = _a1111_rebuild_conventional(up, down, output_shape)
    elif "hada_w1_a" in t:  # network_hada.py
        w1a, w1b, w2a, w2b = t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"]
        dim = w1b.shape[0]
        output_shape = [w1a.size(0), w1b.size(1)]
        if "hada_t1" in t:
            output_shape = [w1a.size(1), w1b.size(1)]
            updown1 = _a1111_make_weight_cp(t["hada_t1"], w1a, w1b)
            output_shape += t["hada_t1"].shape[2:]
        else:
            if len(w1b.shape) == 4:
                output_shape += w1b.shape[2:]
            updown1 = _a1111_rebuild_conventional(w1a, w1b, output_shape)
        if "hada_t2" in t:
            updown2 = _a1111_make_weight_cp(t["hada_t2"], w2a, w2b)
        else:
            updown2 = _a1111_rebuild_conventional(w2a, w2b, output_shape)
        updown = updown1 * updown2
    else:  # network_lokr.py
        if "lokr_w1_b" in t:
            dim = t["lokr_w1_b"].shape[0]
        if "lokr_w2_b" in t:
            dim = t["lokr_w2_b"].shape[0]
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" not in t:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        else:
            w2 = _a1111_make_weight_cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if len(weight.shape) == 4:
            output_shape = weight.shape
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(output_shape)
    # network.py finalize_updown (no bias, multiplier 1) with calc_scale = alpha / dim
    if len(output_shape) == 4:
        updown = updown.reshape(output_shape)
    if weight.size().numel() == updown.size().numel():
        updown = updown.reshape(weight.shape)
    alpha = t["alpha"].item() if "alpha" in t else None
    updown = updown * (alpha / dim if dim is not None and alpha is not None else 1.0)
    if "dora_scale" in t:  # apply_weight_decompose: the norm per input column, always
        merged = updown + weight
        updown = merged * (t["dora_scale"] / _norm_per_input_column(merged)) - weight
    return weight + updown


# ---------------------------------------------------------------- the trained layers and their file


CASES = {  # name: (kind, add_lora's options, the LyCORIS tensors some module of the file must hold)
    "locon": ("lora", {}, {"lora_down.weight"}),
    "loha": ("loha", {}, {"hada_w1_a"}),
    "loha-tucker": ("loha", {"lycoris": network.LycorisOptions(use_tucker=True)}, {"hada_t1", "hada_t2"}),
    "lokr-factored": ("lokr", {}, {"lokr_w2_a", "lokr_w2_b"}),
    "lokr-whole": ("lokr", {"rank": 64}, {"lokr_w1", "lokr_w2"}),
    "lokr-decompose-both": ("lokr", {"lycoris": network.LycorisOptions(decompose_both=True)}, {"lokr_w1_a", "lokr_w1_b"}),
    "lokr-tucker": ("lokr", {"lycoris": network.LycorisOptions(use_tucker=True)}, {"lokr_t2"}),
    "dora-input": ("dora", {"dora_axis": "input"}, {"dora_scale"}),
}


def _trained(make, kind: str, options: dict):
    options = dict(options)
    return make(kind, options.pop("rank", RANK), ALPHA, CONV_RANK, CONV_ALPHA, 3, **options)


def _by_kohya_name(pipe, effective_weights) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted layer's (base weight, effective weight) by its name in the kohya file."""
    base = {}
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for name, layer in network._adapter_layers(model, "default").items():
            base[f"{component}.{network._canonical(component, name)}"] = layer.get_base_layer().weight.detach().clone()
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    return {
        prefixes[path.partition(".")[0]] + path.partition(".")[2].replace(".", "_"): (base[path], weight)
        for path, weight in effective_weights(pipe).items()
    }


@pytest.mark.parametrize("case", list(CASES))
def test_comfyui_and_a1111_apply_exactly_the_trained_weight(case, tmp_path, adapted_tiny_pipe, effective_weights):
    kind, options, must_hold = CASES[case]
    pipe = _trained(adapted_tiny_pipe, kind, options)
    trained = _by_kohya_name(pipe, effective_weights)
    state = network.extract_lora_state({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    tensors = load_file(write_kohya(state, tmp_path / "lora.safetensors", {}, SD1))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, rest = key.partition(".")
        modules.setdefault(name, {})[rest] = tensor
    assert set(modules) == set(trained)  # every module of the file is a layer that was trained, and every layer is in it
    assert any(must_hold <= set(held) for held in modules.values()), case
    convs = 0
    for name, held in modules.items():
        base, expected = trained[name]
        assert not torch.allclose(expected, base, rtol=1e-3, atol=0), name  # the update is not nothing
        if "lokr_t2" in held:  # ComfyUI: torch.kron of the rebuilt half fails, the layer is skipped (module docstring)
            with pytest.raises(RuntimeError, match="view size is not compatible"):
                comfyui_weight(held, base.clone())
        else:
            torch.testing.assert_close(comfyui_weight(held, base.clone()), expected, rtol=1e-5, atol=1e-6, msg=f"ComfyUI {name}")
        torch.testing.assert_close(a1111_weight(held, base.clone()), expected, rtol=1e-5, atol=1e-6, msg=f"A1111 {name}")
        convs += base.dim() == 4 and base.shape[-1] == 3
    assert convs  # the 3x3 convs (LoCon's, the Tucker forms') are among them


def test_dora_per_output_row_is_what_those_loaders_apply_inexactly(tmp_path, adapted_tiny_pipe, effective_weights):
    """peft's DoRA (--dora-axis output) read back by the restated loaders: neither gives the trained weight, which is
    why the run prints a note (`outputs.loader_notes`) and `--dora-axis input` exists."""
    pipe = _trained(adapted_tiny_pipe, "dora", {})
    trained = _by_kohya_name(pipe, effective_weights)
    state = network.extract_lora_state({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    tensors = load_file(write_kohya(state, tmp_path / "lora.safetensors", {}, SD1))
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    held = {key.partition(".")[2]: tensor for key, tensor in tensors.items() if key.startswith(name + ".")}
    base, expected = trained[name]
    assert held["dora_scale"].shape == (base.shape[0], 1)
    for loader in (comfyui_weight, a1111_weight):
        assert not torch.allclose(loader(held, base.clone()), expected, rtol=1e-3, atol=1e-4), loader.__name__
