"""--optimizer and --optimizer-args: each CPU-capable optimizer trains from the CLI with its arguments, resumes bit
for bit, the default stays torch's AdamW exactly, and every mistake is one line before anything loads."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sdlora.training.base_model
import sdlora.training.recipe
from sdlora.cli import main
from sdlora.training import optimizers
from sdlora.training.config import TrainConfig
from sdlora.training.optimizers import OPTIMIZERS, build_optimizer, check_optimizer, parse_optimizer_args
from sdlora.training.recipe import train

FAST = ["--model", "tiny", "--resolution", "64", "--rank", "4", "--alpha", "8", "--steps", "2", "--batch-size", "2",
        "--checkpoint-every", "0", "--validate-every", "0", "--sample-steps", "1", "--trigger", "sks", "--seed", "3"]  # fmt: skip
# per CPU-capable optimizer (adamw8bit needs a CUDA GPU): its usual --lr, one --optimizer-args value other than its default, and the class it builds
CPU_OPTIMIZERS = {
    "adamw": ("1e-3", ("betas", "(0.8,0.99)", (0.8, 0.99)), torch.optim.AdamW),
    "prodigy": ("1.0", ("d_coef", "2", 2), "Prodigy"),
    "adafactor": ("1e-3", ("clip_threshold", "0.5", 0.5), "Adafactor"),
    "lion": ("3e-4", ("betas", "(0.95,0.98)", (0.95, 0.98)), "Lion"),
}


def lora_of(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "pytorch_lora_weights.safetensors")


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


@pytest.fixture
def spy_build(monkeypatch):
    """Records what recipe.setup builds: the optimizer and the trained parameters' values before the first step."""
    seen: dict = {}
    real = sdlora.training.recipe.build_optimizer

    def spy(name, param_groups, lr, weight_decay, args):
        param_groups = list(param_groups)
        seen["before"] = [p.detach().clone() for group in param_groups for p in group["params"]]
        seen["optimizer"] = real(name, param_groups, lr, weight_decay, args)
        return seen["optimizer"]

    monkeypatch.setattr(sdlora.training.recipe, "build_optimizer", spy)
    return seen


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model fails the test: the error under test must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the optimizer settings were checked")

    monkeypatch.setattr(sdlora.training.base_model, "load_pipeline", refuse)


# ---------------------------------------------------------------- parsing --optimizer-args


def test_args_parse_as_python_literals_kohya_style():
    parsed = parse_optimizer_args(
        ["d_coef=2", "safeguard_warmup=True", "decouple=false", "betas=(0.9,0.99)", "eps=1e-30,1e-3", "beta3=None", "name='a b'"]
    )
    assert parsed == {
        "d_coef": 2,
        "safeguard_warmup": True,
        "decouple": False,
        "betas": (0.9, 0.99),
        "eps": (1e-30, 1e-3),
        "beta3": None,
        "name": "a b",
    }
    assert type(parsed["d_coef"]) is int and parsed["decouple"] is False
    # several pairs in one (quoted) item, a tuple with a space in it, inf
    assert parse_optimizer_args(["d_coef=0.5 betas=(0.9, 0.99)  growth_rate=inf"]) == {
        "d_coef": 0.5,
        "betas": (0.9, 0.99),
        "growth_rate": float("inf"),
    }
    assert parse_optimizer_args([]) == {}


@pytest.mark.parametrize(
    ("items", "names"),
    [
        (["d_coef=two"], "d_coef=two: 'two' is not a Python literal"),
        (["d_coef"], "'d_coef' is not key=value"),
        (["=2"], "'=2' is not key=value"),
        (["d_coef="], "'d_coef=' is not key=value"),
        (["d_coef=1", "d_coef=2"], "d_coef is given twice"),
        (["betas=(0.9,"], "'(0.9,' is not a Python literal"),
    ],
)
def test_malformed_args_are_one_line_errors(items, names):
    with pytest.raises(ValueError) as caught:
        parse_optimizer_args(items)
    assert names in str(caught.value) and "\n" not in str(caught.value)


def test_values_are_never_evaluated(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match="is not a Python literal"):
        parse_optimizer_args([f"d_coef=__import__('pathlib').Path({str(marker)!r}).touch()"])
    assert not marker.exists()


# ---------------------------------------------------------------- the default is today's AdamW


def test_default_adamw_is_torch_adamw_exactly():
    assert TrainConfig.from_options(data_dir="d", output_dir="o").optimization.optimizer == "adamw"
    assert TrainConfig.from_options(data_dir="d", output_dir="o").optimization.optimizer_args == []

    def groups(seed: int):
        torch.manual_seed(seed)
        return [
            {"params": [torch.nn.Parameter(torch.randn(5, 3))], "lr": 1e-3},
            {"params": [torch.nn.Parameter(torch.randn(4))], "lr": 5e-4},
        ]

    ours_groups, torch_groups = groups(0), groups(0)
    ours = build_optimizer("adamw", ours_groups, 1e-3, 1e-2, {})
    reference = torch.optim.AdamW(torch_groups, lr=1e-3, weight_decay=1e-2)
    assert type(ours) is torch.optim.AdamW
    for step in range(3):
        for a, b in zip(ours_groups, torch_groups):
            gradient = torch.randn_like(a["params"][0], generator=torch.Generator().manual_seed(step))
            a["params"][0].grad, b["params"][0].grad = gradient.clone(), gradient.clone()
        ours.step()
        reference.step()
    for a, b in zip(ours_groups, torch_groups):
        assert torch.equal(a["params"][0], b["params"][0])
    mine, theirs = ours.state_dict(), reference.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    for index, state in theirs["state"].items():
        assert mine["state"][index].keys() == state.keys()
        assert all(torch.equal(mine["state"][index][key], value) for key, value in state.items())


# ---------------------------------------------------------------- each optimizer from the CLI


@pytest.mark.slow  # over a second: several training runs
@pytest.mark.parametrize("name", list(CPU_OPTIMIZERS))  # prodigyopt, lion-pytorch: in the test extra
def test_each_optimizer_trains_from_the_cli_with_its_args(dataset, tmp_path, capsys, spy_build, name):
    lr, (key, text, value), expected_class = CPU_OPTIMIZERS[name]
    out = tmp_path / "run"
    code = main(["train", str(dataset), "--output", str(out), *FAST, "--lr", lr, "--optimizer", name, "--optimizer-args", f"{key}={text}"])
    assert code == 0, capsys.readouterr().err[-2000:]
    optimizer = spy_build["optimizer"]
    if isinstance(expected_class, str):
        assert type(optimizer).__name__ == expected_class
    else:
        assert type(optimizer) is expected_class
    group = optimizer.param_groups[0]
    assert group[key] == value  # the --optimizer-args value reached the constructor
    for default_key, default in OPTIMIZERS[name].defaults.items():
        assert group[default_key] == (value if default_key == key else default), default_key  # the table's, where not overridden
    assert group["weight_decay"] == 1e-2
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    changed = sum(not torch.equal(before, after) for before, after in zip(spy_build["before"], trained))
    assert changed >= len(trained) // 2, f"{name}: only {changed} of {len(trained)} LoRA tensors changed"
    assert any(t.abs().sum() > 0 for k, t in lora_of(out).items() if "lora_B" in k)  # up weights start at zero
    written = (out / "config.toml").read_text()
    assert f'optimizer = "{name}"' in written and f'optimizer_args = ["{key}={text}"]' in written


@pytest.mark.slow  # over a second: several training runs
@pytest.mark.parametrize("name", list(CPU_OPTIMIZERS))  # prodigyopt, lion-pytorch: in the test extra
def test_resumed_run_ends_bit_identical_to_a_straight_one(dataset, tmp_path, monkeypatch, tiny_config, name):
    # the constant schedule: a 2-step first half would build another cosine curve than the 4-step straight run
    options = dict(optimizer=name, lr=float(CPU_OPTIMIZERS[name][0]), optimizer_args=["weight_decay=0.05"])
    straight = lora_of(train(tiny_config(dataset, tmp_path / "straight", steps=4, **options)).parent)
    train(tiny_config(dataset, tmp_path / "resumed", steps=2, **options))  # ends with a checkpoint at step 2
    shutil.copytree(tmp_path / "resumed", tmp_path / "forgetful")
    resumed = lora_of(train(tiny_config(dataset, tmp_path / "resumed", steps=4, resume="latest", **options)).parent)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), f"{name}: {key}"
    # the optimizer state matters: a resume that dropped it ends elsewhere (so the equality above means something)
    monkeypatch.setattr(optimizers.optimizer_class(name), "load_state_dict", lambda self, state: None)
    forgetful = lora_of(train(tiny_config(dataset, tmp_path / "forgetful", steps=4, resume="latest", **options)).parent)
    assert any(not torch.equal(forgetful[key], straight[key]) for key in straight), name


# ---------------------------------------------------------------- mistakes: one line, before anything loads


def test_unknown_optimizer_name_is_one_line_everywhere(tmp_path, capsys, dataset):
    with pytest.raises(ValueError) as caught:
        TrainConfig.from_options(data_dir="d", output_dir="o", optimizer="sgd")
    assert str(caught.value) == "--optimizer 'sgd' is invalid: it must be one of adamw, adamw8bit, prodigy, adafactor, lion"
    with pytest.raises(ValueError, match="--optimizer 'sgd' is invalid: it must be one of adamw, "):
        build_optimizer("sgd", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1e-3, 0.0)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:  # argparse's own choices check
        main(["train", str(dataset), "--output", str(out), *FAST, "--optimizer", "sgd"])
    assert exited.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("sdlora train: error: argument --optimizer: invalid choice: 'sgd'") and "prodigy" in line
    toml = tmp_path / "train.toml"
    toml.write_text('optimizer = "sgd"\n')
    assert main(["train", str(dataset), "--output", str(out), *FAST, "--config", str(toml)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f'sdlora train: error: {toml}: optimizer = "sgd" must be one of adamw, adamw8bit, prodigy, adafactor, lion'
    assert not out.exists()


def test_missing_package_names_the_pip_command(tmp_path, capsys, dataset, monkeypatch, no_model_load):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # an import of it now raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    with pytest.raises(ValueError) as caught:
        build_optimizer("prodigy", params, 1.0, 0.0)
    assert (
        str(caught.value) == '--optimizer prodigy: prodigyopt is not installed: pip install "sdlora[prodigy]" (or pip install prodigyopt)'
    )
    with pytest.raises(ValueError, match=r'lion-pytorch is not installed: pip install "sdlora\[lion\]" \(or pip install lion-pytorch\)'):
        check_optimizer("lion", 1e-4, 0.0, {})
    out = tmp_path / "run"
    assert main(["train", str(dataset), "--output", str(out), *FAST, "--optimizer", "prodigy", "--lr", "1"]) == 2
    assert one_error_line(capsys.readouterr().err) == f"sdlora train: error: {caught.value}"
    assert not out.exists()


class _RefusingFinder:
    """A meta-path finder that makes importing `name` raise, as bitsandbytes does without its CUDA libraries."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] == self.name:
            raise RuntimeError("CUDA Setup failed despite GPU being available.\nmore lines")
        return None


def test_adamw8bit_missing_broken_or_unusable_bitsandbytes_is_one_line(monkeypatch):
    params = [{"params": [torch.nn.Parameter(torch.zeros(4096))]}]
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "bitsandbytes", None)
        patch.setitem(sys.modules, "bitsandbytes.optim", None)
        with pytest.raises(ValueError) as caught:
            build_optimizer("adamw8bit", params, 1e-3, 0.0)
        assert (
            str(caught.value)
            == '--optimizer adamw8bit: bitsandbytes is not installed: pip install "sdlora[adamw8bit]" (or pip install bitsandbytes)'
        )
    with monkeypatch.context() as patch:
        for module in [m for m in sys.modules if m.split(".")[0] == "bitsandbytes"]:
            patch.delitem(sys.modules, module)
        patch.setattr(sys, "meta_path", [_RefusingFinder("bitsandbytes"), *sys.meta_path])
        with pytest.raises(ValueError) as caught:
            check_optimizer("adamw8bit", 1e-3, 0.0, {})
        assert str(caught.value) == (
            "--optimizer adamw8bit: bitsandbytes is installed but cannot be used here (CUDA Setup failed despite GPU being available.)"
        )

    class AdamW8bit(torch.optim.AdamW):  # imports and builds, fails at its first step (no GPU kernels)
        def step(self, closure=None):
            raise RuntimeError("cpu is not supported\nmore")

    fake = types.ModuleType("bitsandbytes.optim")
    fake.AdamW8bit = AdamW8bit
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as caught:
        check_optimizer("adamw8bit", 1e-3, 0.0, {})
    assert str(caught.value) == (
        "--optimizer adamw8bit cannot train here (bitsandbytes' 8-bit optimizers need a CUDA GPU): cpu is not supported"
    )


def test_unknown_argument_lists_the_accepted_ones_before_the_model_loads(tmp_path, capsys, dataset, no_model_load):
    with pytest.raises(ValueError) as caught:
        build_optimizer("prodigy", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1.0, 0.0, {"d_coeff": 2})
    message = str(caught.value)
    assert message.startswith("--optimizer-args d_coeff: Prodigy (--optimizer prodigy) takes no argument 'd_coeff'; it takes betas, ")
    accepted = message.split("it takes ")[1].split(", ")
    assert "d_coef" in accepted and "safeguard_warmup" in accepted and "\n" not in message
    assert "params" not in accepted and "lr" not in accepted  # set by sdlora, not by --optimizer-args
    out = tmp_path / "run"
    args = ["train", str(dataset), "--output", str(out), *FAST, "--lr", "1", "--optimizer", "prodigy", "--optimizer-args", "d_coeff=2"]
    assert main(args) == 2
    assert one_error_line(capsys.readouterr().err) == f"sdlora train: error: {message}"
    assert not out.exists()


@pytest.mark.parametrize(
    ("optimizer", "args", "says"),
    [
        ("adamw", ["betas=0.9"], "--optimizer-args betas=0.9: AdamW's betas must be a tuple like (0.9, 0.99)"),
        (
            "adamw",
            ["betas=(0.9,)"],
            "--optimizer-args betas=(0.9,): AdamW's betas must be a tuple of 2 numbers like its default (0.9, 0.999)",
        ),
        ("adamw", ["betas=(0.9,'x')"], "--optimizer-args betas=(0.9, 'x'): AdamW's betas must be a tuple of 2 numbers like its default"),
        ("lion", ["betas=0.9,0.99,0.999"], "--optimizer-args betas=(0.9, 0.99, 0.999): Lion's betas must be a tuple of 2 numbers like"),
        ("prodigy", ["betas=[0.9]"], "--optimizer-args betas=[0.9]: Prodigy's betas must be a tuple of 2 numbers like its default"),
        pytest.param(
            "adafactor",
            ["relative_step=1"],
            "--optimizer-args relative_step=1: Adafactor's relative_step must be True or False",
            marks=pytest.mark.slow,  # the first import of transformers.optimization takes seconds
        ),
        pytest.param(
            "adafactor",
            ["warmup_init=True"],
            "--optimizer adafactor --optimizer-args warmup_init=True: `warmup_init=True` requires",
            marks=pytest.mark.slow,
        ),
        ("adamw", ["lr=0.1"], "--optimizer-args lr: not an optimizer argument here: use --lr"),
        ("adamw", ["eps=-1.0"], "--optimizer adamw --optimizer-args eps=-1.0: Invalid epsilon value: -1.0"),
    ],
)
def test_values_the_optimizer_refuses_fail_before_the_model_loads(tmp_path, capsys, dataset, no_model_load, optimizer, args, says):
    out = tmp_path / "run"
    assert main(["train", str(dataset), "--output", str(out), *FAST, "--optimizer", optimizer, "--optimizer-args", *args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"sdlora train: error: {says}"), line
    assert not out.exists()


def test_a_tuple_of_another_length_is_one_line_not_an_index_error():
    for value in [(0.9,), (0.9, 0.99, 0.999), [], (0.9, None)]:
        with pytest.raises(ValueError) as caught:
            check_optimizer("adamw", 1e-3, 0.0, {"betas": value})
        assert (
            str(caught.value)
            == f"--optimizer-args betas={value!r}: AdamW's betas must be a tuple of 2 numbers like its default (0.9, 0.999)"
        )
    check_optimizer("adamw", 1e-3, 0.0, {"betas": [0.8, 0.99]})  # a list of the right length is fine


def test_malformed_value_from_the_cli_and_from_a_config(tmp_path, capsys, dataset):
    with pytest.raises(ValueError) as caught:
        TrainConfig.from_options(data_dir="d", output_dir="o", optimizer="prodigy", optimizer_args=["d_coef=two"])
    assert str(caught.value).startswith("--optimizer-args d_coef=two: 'two' is not a Python literal") and "\n" not in str(caught.value)
    out = tmp_path / "run"
    assert main(["train", str(dataset), "--output", str(out), *FAST, "--optimizer-args", "d_coef=two"]) == 2
    assert one_error_line(capsys.readouterr().err) == f"sdlora train: error: {caught.value}"
    toml = tmp_path / "train.toml"
    toml.write_text('optimizer_args = "d_coef=2"\n')  # a string where a list belongs
    assert main(["train", str(dataset), "--output", str(out), *FAST, "--config", str(toml)]) == 2
    says = f'{toml}: optimizer_args = "d_coef=2" must be a list of strings, e.g. ["d_coef=2"]'
    assert one_error_line(capsys.readouterr().err) == f"sdlora train: error: {says}"
    assert not out.exists()


def test_prodigy_refuses_a_different_text_encoder_lr_up_front():
    with pytest.raises(
        ValueError, match=r"--optimizer prodigy takes one learning rate for every trained part, got 0\.5, 1: pass --text-encoder-lr"
    ):
        TrainConfig.from_options(data_dir="d", output_dir="o", optimizer="prodigy", lr=1.0, train_text_encoder=True)
    config = TrainConfig.from_options(
        data_dir="d", output_dir="o", optimizer="prodigy", lr=1.0, train_text_encoder=True, text_encoder_lr=1.0
    )
    assert config.optimization.lr_of("text_encoder") == config.optimization.lr_of("unet") == 1.0


def test_prodigy_at_an_adamw_learning_rate_warns():
    with pytest.warns(UserWarning, match=r"--optimizer prodigy with --lr 0\.0001: .* the usual value is 1\.0"):
        check_optimizer("prodigy", 1e-4, 0.0, {})


def test_the_table_names_an_install_hint_for_every_optional_package():
    for name, spec in OPTIMIZERS.items():
        assert name in optimizers.OPTIMIZER_NAMES
        if spec.package is not None:
            assert spec.extra is not None and f"sdlora[{spec.extra}]" in spec.install_hint and spec.package in spec.install_hint, name


def test_kohya_label_names_the_class_and_its_arguments():
    assert optimizers.optimizer_label("adamw") == "torch.optim.AdamW"  # what the kohya file's ss_optimizer always said
    assert (
        optimizers.optimizer_label("prodigy", {"d_coef": 2})
        == "prodigyopt.Prodigy(d_coef=2,use_bias_correction=True,safeguard_warmup=True)"
    )
    assert optimizers.optimizer_label("lion", {"weight_decay": 0.1}) == "lion_pytorch.Lion"


def test_the_kohya_file_names_the_optimizer_used(tmp_path):
    from sdlora.training.config import TrainConfig
    from sdlora.training.outputs import training_metadata

    config = TrainConfig.from_options(
        data_dir=str(tmp_path / "d"), output_dir=str(tmp_path / "o"), optimizer="lion", optimizer_args=["betas=(0.9,0.99)"]
    )
    label = training_metadata(config, [])["ss_optimizer"]
    assert "Lion" in label and label != "torch.optim.AdamW"
