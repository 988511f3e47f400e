"""LyCORIS's own network_args in training (training/network.py `LycorisOptions`): LoKr's factor and decompose_both,
Tucker 3x3 convs for LoHa and LoKr, and LyCORIS's rank and module dropouts. Each written kohya file is checked
against peft's trained layers, sdlora's merge and LyCORIS 4.1.3's own modules (forward pass, and the tensors a
LyCORIS network built with the same arguments would hold)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sdlora.core.families import SD1
from sdlora.core.files import read_lora, write_kohya
from sdlora.core.kinds import LohaModule, LokrModule
from sdlora.core.targets import text_encoder_target_modules
from sdlora.errors import UserError
from sdlora.inference.merge import merge_lora
from sdlora.models.tiny import build_tiny_pipeline
from sdlora.training import network
from sdlora.training.network import LycorisOptions

lycoris_modules = pytest.importorskip("lycoris.modules")
lycoris_general = pytest.importorskip("lycoris.functional.general")

ALPHA, CONV_RANK, CONV_ALPHA = 6.0, 2, 3.0  # alpha != rank; the 3x3 convs at another rank and alpha
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def _trained(make, kind: str, rank: int, options: LycorisOptions):
    """The tiny pipeline with `kind` on every UNet layer (3x3 convs at CONV_RANK) and the text encoder (whose MLP is
    37 wide: a prime, which no factor divides), its adapter weights set at random as training would leave them."""
    return make(kind, rank, ALPHA, CONV_RANK, CONV_ALPHA, 5, lycoris=options)


def _check_file_against_peft_and_lycoris(
    pipe, kind: str, rank: int, options: LycorisOptions, tmp_path, effective_weights, layer_reference
) -> dict[str, tuple[set[str], bool]]:
    """The kohya file of `pipe`'s adapter: sdlora's merge of it and LyCORIS 4.1.3's module loaded from it equal each
    peft layer's effective weight (rtol 1e-5), and a LyCORIS module built on the base layer with the same arguments
    holds the same tensor names and shapes. Returns each module's tensor names and whether it is a 3x3 conv."""
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    expected = effective_weights(pipe)
    state = network.extract_lora_state(models)
    path = write_kohya(state, tmp_path / f"{kind}.safetensors", {}, SD1)
    tensors = load_file(path)

    merged, base = build_tiny_pipeline(), build_tiny_pipeline()
    assert merge_lora(merged, [(path, 1.0)]) == len(expected)

    def layers(pipeline):
        parts = (("unet", pipeline.unet), ("text_encoder", pipeline.text_encoder))
        return {f"{c}.{network._canonical(c, n)}": m for c, model in parts for n, m in model.named_modules() if n}

    merged_layers, base_layers = layers(merged), layers(base)
    generator = torch.Generator().manual_seed(1)
    held = {}
    module_class = lycoris_modules.LokrModule if kind == "lokr" else lycoris_modules.LohaModule
    for path_name, weight in expected.items():
        component, _, layer_path = path_name.partition(".")
        lora_name = PREFIXES[component] + layer_path.replace(".", "_")
        layer = base_layers[path_name]
        assert not torch.allclose(weight, layer.weight, rtol=1e-3, atol=0), path_name  # the update is not nothing
        torch.testing.assert_close(merged_layers[path_name].weight, weight, rtol=1e-5, atol=1e-6, msg=path_name)

        # LyCORIS's own module built on the base layer with these network_args (as its network is) holds the same
        # tensors, and loaded from the file (its alpha too) computes the layer at peft's weight
        conv3 = isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1)
        ours = {key.partition(".")[2]: t for key, t in tensors.items() if key.partition(".")[0] == lora_name}
        built = module_class(
            lora_name, layer, lora_dim=CONV_RANK if conv3 else rank, alpha=float(ours["alpha"]),
            use_tucker=options.use_tucker, decompose_both=options.decompose_both, factor=options.factor,
        )  # fmt: skip
        assert {k: tuple(t.shape) for k, t in built.state_dict().items()} == {k: tuple(t.shape) for k, t in ours.items()}, path_name
        built.load_state_dict(ours)
        x, reference = layer_reference(layer, weight, generator)
        with torch.no_grad():
            torch.testing.assert_close(built(x), reference, rtol=1e-5, atol=1e-5, msg=path_name)
        held[lora_name] = (set(ours), conv3)
    return held


def test_factorization_is_lycoris_not_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dimension in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 32):
            assert network.lycoris_factorization(dimension, factor) == lycoris_general.factorization(dimension, factor)
    # where peft's own split differs (a dividing factor larger than its cofactor), LyCORIS's is taken
    assert peft_factorization(64, 16) == (16, 4) and network.lycoris_factorization(64, 16) == (4, 16)
    assert network.lycoris_factorization(37, 4) == (1, 37)  # no divisor: LyCORIS's fallback, the best split within 4


@pytest.mark.parametrize(
    ("rank", "options", "forms"),
    [
        # factor 4: 32 -> (4, 8), w2 whole at rank 4 (4 >= 8 / 2: both halves whole, scale 1); 64 -> (4, 16) and
        # 128 -> (4, 32) factored; the text encoder's 37 -> (1, 37), factored
        (4, LycorisOptions(factor=4), {("w1", "w2"), ("w1", "w2a", "w2b")}),
        # factor 16, where peft's split differs (64 -> LyCORIS (4, 16), peft (16, 4)), w1 also factored where its
        # rank is below half its larger side (a factored first half never meets a whole second: l <= k and m <= n)
        (1, LycorisOptions(factor=16, decompose_both=True), {("w1a", "w1b", "w2a", "w2b"), ("w1", "w2a", "w2b")}),
    ],
)
def test_lokr_factor_and_decompose_both_write_the_trained_update(
    rank, options, forms, tmp_path, adapted_tiny_pipe, effective_weights, layer_reference
):
    pipe = _trained(adapted_tiny_pipe, "lokr", rank, options)
    _check_file_against_peft_and_lycoris(pipe, "lokr", rank, options, tmp_path, effective_weights, layer_reference)
    state = read_lora(tmp_path / "lokr.safetensors")
    found = {tuple(sorted(module.factors())) for module in state.modules.values()}
    assert all(isinstance(module, LokrModule) for module in state.modules.values())
    assert forms <= found, found


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_tucker_convs_write_the_trained_update(kind, tmp_path, adapted_tiny_pipe, effective_weights, layer_reference):
    options = LycorisOptions(use_tucker=True)
    pipe = _trained(adapted_tiny_pipe, kind, 4, options)
    held = _check_file_against_peft_and_lycoris(pipe, kind, 4, options, tmp_path, effective_weights, layer_reference)
    cores = {"loha": {"hada_t1", "hada_t2"}, "lokr": {"lokr_t2"}}[kind]
    with_core = {name for name, (keys, _) in held.items() if cores <= keys}
    assert with_core == {name for name, (_, conv3) in held.items() if conv3}  # the 3x3 convs, not 1x1 ones or Linears
    state = read_lora(tmp_path / f"{kind}.safetensors")
    tucker = [m for m in state.modules.values() if (m.t1 if isinstance(m, LohaModule) else m.t2) is not None]
    assert len(tucker) == len(with_core)


def test_lycoris_dropouts_act_in_training_mode_only(adapted_tiny_pipe):
    options = LycorisOptions(rank_dropout=0.5, module_dropout=0.5, rank_dropout_scale=True)
    pipe = _trained(adapted_tiny_pipe, "lokr", 4, options)
    layers = network._adapter_layers(pipe.text_encoder, "default")
    layer = next(layer for name, layer in layers.items() if name.endswith("layers.0.self_attn.q_proj"))
    x = torch.randn(2, 3, layer.get_base_layer().in_features)
    network.set_adapter_training(pipe.text_encoder, False)
    with torch.no_grad():
        steady = [layer(x) for _ in range(3)]
    assert all(torch.equal(steady[0], out) for out in steady)  # evaluation: the whole update, every time
    base = layer.get_base_layer()(x)
    assert not torch.allclose(steady[0], base)
    network.set_adapter_training(pipe.text_encoder, True)
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = [layer(x) - base for _ in range(40)]
    full = steady[0] - base
    skipped = [out for out in outputs if torch.equal(out, torch.zeros_like(out))]
    assert 8 <= len(skipped) <= 32  # module_dropout 0.5: about half the calls add nothing
    for out in (out for out in outputs if not torch.equal(out, torch.zeros_like(out))):
        rows = out.abs().sum(dim=(0, 1)) > 0  # rank_dropout: whole output rows of the update dropped, the rest scaled
        assert 0 < rows.sum() < rows.numel()
        scale = rows.numel() / rows.sum()
        torch.testing.assert_close(out[..., rows], full[..., rows] * scale, rtol=1e-5, atol=1e-6)
    # a skipped layer still gives its parameters a (zero) gradient, as DDP needs
    params = [p for p in network.lora_parameters(pipe.text_encoder) if any(p is q for q in layer.parameters())]
    torch.manual_seed(0)
    for _ in range(40):
        for param in params:
            param.grad = None
        layer(x).sum().backward()
        assert all(param.grad is not None for param in params)


def test_lycoris_options_refused_in_one_line():
    pipe = build_tiny_pipeline()
    targets = text_encoder_target_modules(pipe.text_encoder)
    cases = [
        ("lora", LycorisOptions(factor=4), "factor .* --kind lora .* --kind lokr"),
        ("loha", LycorisOptions(decompose_both=True), "--kind loha has none"),
        ("lokr", LycorisOptions(factor=0), "factor must be -1 .* got 0"),
        ("dora", LycorisOptions(use_tucker=True), "--kind dora has no Tucker form"),
        ("lora", LycorisOptions(module_dropout=0.1), "LoHa's and LoKr's; --kind lora takes kohya's"),
        ("loha", LycorisOptions(rank_dropout=0.1), "add --rank-dropout-scale"),
    ]
    for kind, options, message in cases:
        with pytest.raises(UserError, match=message):
            network.add_lora(pipe.text_encoder, targets, 4, ALPHA, kind=kind, lycoris=options)
    assert not network._adapter_layers(pipe.text_encoder, None)  # refused before any layer was changed


@pytest.mark.slow  # three short runs
def test_lokr_run_with_lycoris_options_writes_them_and_resumes_bit_for_bit(make_dataset, tmp_path, tiny_config):
    from sdlora.training.recipe import train

    dataset = make_dataset(tmp_path / "data", count=2)
    options = dict(
        kind="lokr", preset="all", rank=4, alpha=ALPHA, conv_rank=CONV_RANK, conv_alpha=CONV_ALPHA, lokr_factor=4, use_tucker=True,
        rank_dropout=0.3, module_dropout=0.2, samples=False, checkpoint_every=1, steps=2, batch_size=1,
    )  # fmt: skip
    straight = train(tiny_config(dataset, tmp_path / "straight", **options))
    train(tiny_config(dataset, tmp_path / "resumed", **(options | {"steps": 1})))
    resumed = train(tiny_config(dataset, tmp_path / "resumed", **options, resume="latest"))
    expected, actual = load_file(straight), load_file(resumed)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)  # the dropouts' draws resume exactly too
    assert any(key.endswith("lokr_t2") for key in expected)
    shapes = {key: tuple(tensor.shape) for key, tensor in expected.items()}
    q_proj = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # 64 wide: factor 4 -> (4, 16), not (8, 8)
    assert (shapes[f"{q_proj}.lokr_w1"], shapes[f"{q_proj}.lokr_w2_a"], shapes[f"{q_proj}.lokr_w2_b"]) == ((4, 4), (16, 4), (4, 16))
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # 32 -> 32, 3x3 at CONV_RANK: (4, 8) with a Tucker core
    assert [shapes[f"{conv}.{name}"] for name in ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2")] == [(4, 4), (2, 8), (2, 8), (2, 2, 3, 3)]
    state = read_lora(straight)
    args = json.loads(state.metadata["ss_network_args"])
    assert (args["algo"], args["factor"], args["use_tucker"], args["rank_dropout"], args["module_dropout"]) == (
        "lokr",
        "4",
        "True",
        "0.3",
        "0.2",
    )


def test_lycoris_kohya_config_gives_the_same_config_as_its_command_line(tmp_path):
    import shlex

    from sdlora.cli import build_parser
    from sdlora.config import config_from_args
    from sdlora.training.config import TrainConfig
    from sdlora.training.kohya_config import command_line, read_kohya_config

    path = tmp_path / "kohya.toml"
    path.write_text(
        'train_data_dir = "img"\noutput_dir = "out"\nnetwork_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "factor=8", '
        '"decompose_both=True", "conv_dim=4", "use_cp=True", "rank_dropout=0.1", "module_dropout=0.05"]\n'
    )
    options = read_kohya_config(path).options
    line = command_line(options)
    assert "--lokr-factor 8" in line and "--lokr-decompose-both" in line and "--use-tucker" in line
    config = config_from_args(build_parser().parse_args(shlex.split(line)[1:]))
    assert config == TrainConfig.from_options(**options)
    network_section = config.network
    assert (network_section.kind, network_section.lokr_factor, network_section.use_tucker, network_section.module_dropout) == (
        "lokr", 8, True, 0.05,
    )  # fmt: skip
