"""`--kind loha | lokr | dora` in training: peft's layers trained, written in LyCORIS's layout at LyCORIS's scale.

Per module, the weight the trained peft model computes with (peft's own merge) equals what sdlora's merge and
LyCORIS 4.1.3's forward pass make of the written kohya file; short runs of each kind resume bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sdlora.core.families import SD1
from sdlora.core.files import read_lora, write_diffusers, write_kohya
from sdlora.core.kinds import DoraModule, LohaModule, LokrModule
from sdlora.core.state import LoraModule
from sdlora.errors import UserError
from sdlora.inference.grid import find_checkpoints
from sdlora.inference.merge import merge_lora
from sdlora.models.tiny import build_tiny_pipeline
from sdlora.training import network
from sdlora.training.outputs import DIFFUSERS_KINDS
from sdlora.training.recipe import train

RANK, ALPHA, CONV_RANK, CONV_ALPHA = 4, 6.0, 2, 3.0  # alpha != rank; the convs at another rank and alpha
CLASSES = {"lora": LoraModule, "loha": LohaModule, "lokr": LokrModule, "dora": DoraModule}
KOHYA_KEYS = {  # per kind, the LyCORIS tensor names each module of the kohya file must carry
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "alpha"},  # the factored second half: lokr_w2_a / lokr_w2_b instead of lokr_w2
}


def _layers(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's layers by LoraState path (text encoders with `text_model.` on any transformers)."""
    models = (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))
    return {f"{c}.{network._canonical(c, n)}": m for c, model in models for n, m in model.named_modules() if n}


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "dora"])
def test_kohya_file_holds_exactly_the_trained_update(kind, tmp_path, adapted_tiny_pipe, effective_weights, layer_reference):
    pipe = adapted_tiny_pipe(kind, RANK, ALPHA, CONV_RANK, CONV_ALPHA, 5)
    expected = effective_weights(pipe)
    state = network.extract_lora_state({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    assert {type(module) for module in state.modules.values()} == {CLASSES[kind]}
    path = write_kohya(state, tmp_path / f"{kind}.safetensors", {}, SD1)
    tensors = load_file(path)
    names = {key.partition(".")[0] for key in tensors}
    for name in names:
        held = {key.partition(".")[2] for key in tensors if key.startswith(name + ".")}
        if kind == "lokr" and "lokr_w2_a" in held:
            held = held - {"lokr_w2_a", "lokr_w2_b"} | {"lokr_w2"}
        assert held == KOHYA_KEYS[kind], name
    if kind == "dora":  # LyCORIS's magnitude per output row (wd_on_out): [out, 1] for a Linear, [out, 1, 1, 1] for a conv
        scale = tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.dora_scale"]
        assert scale.shape == (_layers(pipe)["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].out_features, 1)
        assert {t.ndim for k, t in tensors.items() if k.endswith("dora_scale")} == {2, 4}
    if kind == "lokr":  # both of LyCORIS's forms: whole halves (scale 1: peft's alpha / r folded into w1) and a
        # factored half (alpha / r, r = the half's rank), the 3x3 convs at CONV_RANK
        scales = {(m.w2 is None, m.scale) for m in read_lora(path).modules.values()}
        assert scales == {(False, 1.0), (True, CONV_ALPHA / CONV_RANK)}, scales

    merged = build_tiny_pipeline()
    assert merge_lora(merged, [(path, 1.0)]) == len(expected) == len(state.modules)
    layers = _layers(merged)
    base = _layers(build_tiny_pipeline())
    for name, weight in expected.items():
        assert not torch.allclose(weight, base[name].weight, rtol=1e-3, atol=0), name  # the update is not nothing
        torch.testing.assert_close(layers[name].weight, weight, rtol=1e-5, atol=1e-6, msg=name)

    if kind in DIFFUSERS_KINDS:  # the diffusers file, loaded and fused by diffusers (peft): the same weights
        diffusers_path = write_diffusers(state, tmp_path / "pytorch_lora_weights.safetensors", SD1)
        loaded = build_tiny_pipeline()
        loaded.load_lora_weights(str(diffusers_path))
        loaded.fuse_lora()
        loaded.unload_lora_weights()
        fused = _layers(loaded)
        for name, weight in expected.items():
            torch.testing.assert_close(fused[name].weight, weight, rtol=1e-5, atol=1e-6, msg=name)
        assert {type(module) for module in read_lora(diffusers_path).modules.values()} == {CLASSES[kind]}

    # LyCORIS 4.1.3 reading the same file: its module's forward pass equals the layer at peft's weight
    pytest.importorskip("lycoris")
    from lycoris.modules import get_module, make_module

    generator = torch.Generator().manual_seed(1)
    read = read_lora(path)
    assert set(read.modules) == set(expected)
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    for name, weight in expected.items():
        component, _, layer_path = name.partition(".")
        lora_name = prefixes[component] + layer_path.replace(".", "_")
        layer = base[name]
        lycoris_type, params = get_module(tensors, lora_name)
        module = make_module(lycoris_type, params, lora_name, layer)
        x, reference = layer_reference(layer, weight, generator)
        with torch.no_grad():
            torch.testing.assert_close(module(x), reference, rtol=1e-5, atol=1e-5, msg=name)


def test_options_a_kind_lacks_are_refused_in_one_line(dataset, tmp_path, tiny_config):
    with pytest.raises(UserError, match="--dropout .* loha"):
        tiny_config(dataset, tmp_path / "out", kind="loha", dropout=0.1)
    with pytest.raises(UserError, match="--init-lora continues a plain LoRA"):
        tiny_config(dataset, tmp_path / "out", kind="dora", init_lora=str(tmp_path / "some.safetensors"))
    with pytest.raises(UserError, match="kind"):
        tiny_config(dataset, tmp_path / "out", kind="oft")
    with pytest.raises(UserError, match="--kind dora .* --fp8-base"):
        tiny_config(dataset, tmp_path / "out", kind="dora", fp8_base=True)
    with pytest.raises(UserError, match=r"--dora-axis sets DoRA's magnitude axis: use it with --kind dora \(now lora\)"):
        tiny_config(dataset, tmp_path / "out", kind="lora", dora_axis="input")
    with pytest.raises(UserError, match="--dora-axis 'rows' is invalid: it must be one of output, input"):
        tiny_config(dataset, tmp_path / "out", kind="dora", dora_axis="rows")
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.slow  # three short runs per kind
@pytest.mark.parametrize("kind", ["loha", "lokr", "dora", "dora-input"])
def test_each_kind_trains_and_resumes_bit_for_bit(kind, make_dataset, tmp_path, tiny_config, capsys):
    dataset = make_dataset(tmp_path / "data", count=2)
    axis = {"dora_axis": "input"} if kind == "dora-input" else {}
    kind, on_input = kind.partition("-")[0], bool(axis)
    options = dict(kind=kind, samples=False, checkpoint_every=1, steps=2, batch_size=1, ema_decay=0.5, **axis)
    straight = train(tiny_config(dataset, tmp_path / "straight", **options))
    card = (tmp_path / "straight" / "README.md").read_text()
    diffusers_file = tmp_path / "straight" / "pytorch_lora_weights.safetensors"
    printed = capsys.readouterr().out
    if kind == "dora" and not on_input:  # diffusers loads DoRA (peft's use_dora): both files
        assert straight == diffusers_file and "load_lora_weights" in card
        assert "diffusers cannot load" not in printed and printed.count("--dora-axis input") == 1  # the loaders' note
        straight = tmp_path / "straight" / "lora.safetensors"
    else:  # the kohya file alone: diffusers cannot load LoHa, LoKr or DoRA per input column, which the run says once
        assert straight.name == "lora.safetensors" and not diffusers_file.exists()
        assert printed.count("diffusers cannot load" if not on_input else "DoRA per output row only") == 1
        assert "pytorch_lora_weights" not in card and "load_lora(pipe" in card
    train(tiny_config(dataset, tmp_path / "resumed", **(options | {"steps": 1})))
    train(tiny_config(dataset, tmp_path / "resumed", **options, resume="latest"))
    for name in (straight.name, straight.name.replace(".safetensors", "_ema.safetensors")):  # the LoRA and its EMA
        expected, actual = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), (name, key)
    last = load_file(straight)
    averaged = load_file(tmp_path / "straight" / straight.name.replace(".safetensors", "_ema.safetensors"))
    assert any(not torch.equal(tensor, last[key]) for key, tensor in averaged.items() if key.endswith(("w1", "_b", "weight")))
    state = read_lora(straight)
    assert {type(module) for module in state.modules.values()} == {CLASSES[kind]}
    # `sdlora grid --lora-steps RUN` finds each checkpoint's LoRA (the kohya file where there is no diffusers file)
    found = find_checkpoints([tmp_path / "straight"])
    expected_name = "pytorch_lora_weights.safetensors" if kind == "dora" and not on_input else "lora.safetensors"
    assert [(c.label, c.path.name) for c in found] == [("step 1", expected_name), ("step 2", expected_name)]
    # the header names LyCORIS's network and algo, as a LyCORIS-trained file's does
    assert state.metadata["ss_network_module"] == "lycoris.kohya"
    args = json.loads(state.metadata["ss_network_args"])
    assert args["algo"] == {"loha": "loha", "lokr": "lokr", "dora": "locon"}[kind] and (args.get("dora_wd") == "True") == (kind == "dora")
    assert args.get("wd_on_output") == ("False" if on_input else None)  # lycoris.kohya's default is True
    if on_input:  # LyCORIS's [1, in] / [1, in, 1, 1]
        assert all(not m.on_output and m.magnitude.shape[0] == 1 for m in state.modules.values())
