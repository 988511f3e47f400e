"""config.py and training/config.py: defaults, TOML + CLI precedence, validation naming the option when built."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sdlora.cli import main
from sdlora.config import add_arguments, config_from_args, load_toml
from sdlora.training.config import DIFFUSERS_STEM, PATH_OPTIONS, SECTIONS, TrainConfig, option_fields, to_toml


def parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_defaults_are_an_sd15_style_lora():
    config = parse(["data", "--output", "out"])
    assert (config.network.rank, config.network.alpha, config.optimization.lr, config.data.batch_size) == (16, 16.0, 1e-4, 1)
    assert config.data.resolution is None  # the model's own size: 512 for SD1.5 (tests/training/test_recipe.py)
    assert config.network.preset == "attn" and config.base.mixed_precision == "auto"


def test_every_option_is_a_flag_and_a_toml_key(tmp_path):
    config_file = tmp_path / "train.toml"
    config_file.write_text(
        'data_dir = "images"\noutput_dir = "out"\nrank = 4\nalpha = 2.5\nbuckets = true\nvalidation_prompts = ["a", "b"]\nlr = 3e-4\n'
    )
    config = parse(["--config", str(config_file), "--rank", "8", "--no-buckets", "--validation-prompts", "c"])
    assert config.network.rank == 8  # flag beats file
    assert config.network.alpha == 2.5 and config.optimization.lr == 3e-4  # file beats default
    assert config.data.buckets is False and config.samples.validation_prompts == ["c"]
    assert config.data.data_dir == str((tmp_path / "images").resolve())  # relative to the file
    assert config.run.output_dir == str((tmp_path / "out").resolve())


def test_effective_config_round_trips_through_toml(tmp_path):
    config = parse(["data", "--output", "out", "--rank", "4", "--alpha", "3", "--trigger", 'say "hi"', "--validation-prompts", "x"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    # the paths as the run meant them (from the folder it ran in), wherever config.toml is read from
    assert TrainConfig.from_options(**load_toml(path)).to_dict() == {
        **config.to_dict(),
        "data_dir": str(Path("data").resolve()),
        "output_dir": str(Path("out").resolve()),
    }


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--rank", "0"], "--rank"),
        (["--steps", "-1"], "--steps"),
        (["--lr", "nan"], "--lr"),
        (["--resolution", "30"], "--resolution"),
        (["--dropout", "1.5"], "--dropout"),
        (["--val-split", "1"], "--val-split"),
        (["--alpha", "inf"], "--alpha"),
    ],
)
def test_bad_values_name_the_option(argv, option):
    with pytest.raises(ValueError, match=f"^{option} "):
        parse(["data", "--output", "out", *argv])


def test_unknown_toml_key_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("rnak = 4\n")
    with pytest.raises(ValueError, match="'rnak'"):
        load_toml(path)
    path.write_text("rank = [\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_toml(path)


def test_nan_is_rejected_not_compared():
    with pytest.raises(ValueError, match="--lr"):
        TrainConfig.from_options(data_dir="d", output_dir="o", lr=float("nan"))


# ---------------------------------------------------------------- --config values checked against the field types


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('flip = "false"', 'flip = "false" must be true or false (a TOML boolean, without quotes)'),
        ('sample_at_first = "no"', 'sample_at_first = "no" must be true or false (a TOML boolean, without quotes)'),
        ('validation_prompts = "a cat"', 'validation_prompts = "a cat" must be a list of strings, e.g. ["a cat"]'),
        ('validation_prompts = ["a", 1]', 'validation_prompts = ["a", 1] must be a list of strings, e.g. ["a", "b"]'),
        ('steps = "2"', 'steps = "2" must be an integer (without quotes)'),
        ('lr = "1e-4"', 'lr = "1e-4" must be a number (without quotes)'),
        ("rank = 4.5", "rank = 4.5 must be an integer"),
        ("seed = 1.5", "seed = 1.5 must be an integer"),
        ("rank = true", "rank = true must be an integer"),
        ("alpha = false", "alpha = false must be a number"),
        ("resume = 5", "resume = 5 must be a string (in quotes)"),
        ("resolution = [512]", "resolution = [512] must be an integer"),
        ('crop = "centre"', 'crop = "centre" must be one of center, random'),
        ('report-to = "tensorbord"', 'report-to = "tensorbord" must be one of tensorboard, wandb, comet_ml, mlflow, aim, all, none'),
    ],
)
def test_toml_value_of_the_wrong_type_is_one_line_naming_file_key_and_value(tmp_path, capsys, line, says):
    toml = tmp_path / "train.toml"
    toml.write_text(f'data_dir = "data"\n{line}\n')
    with pytest.raises(ValueError) as caught:
        load_toml(toml)
    assert str(caught.value) == f"{toml}: {says}"
    out = tmp_path / "out"
    assert main(["train", "--config", str(toml), "--output", str(out)]) == 2
    assert one_error_line(capsys.readouterr().err) == f"sdlora train: error: {toml}: {says}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.toml"]  # nothing written


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("flip", "false", "--flip 'false' is invalid: it must be True or False"),
        ("steps", "2", "--steps '2' is invalid: it must be an integer"),
        ("rank", True, "--rank True is invalid: it must be an integer"),
        ("lr", "1e-4", "--lr '1e-4' is invalid: it must be a number"),
        ("resolution", 512.0, "--resolution 512.0 is invalid: it must be an integer or None"),
        ("resume", 5, "--resume 5 is invalid: it must be a string or None"),
        ("validation_prompts", "a cat", "--validation-prompts 'a cat' is invalid: it must be a list of strings"),
        ("optimizer_args", ("d_coef=2",), "--optimizer-args ('d_coef=2',) is invalid: it must be a list of strings"),
    ],
)
def test_library_config_of_the_wrong_type_is_one_line(option, value, says):
    with pytest.raises(ValueError) as caught:
        TrainConfig.from_options(data_dir="d", output_dir="o", **{option: value})
    assert str(caught.value) == says


def test_every_field_type_is_checked_from_its_annotation():
    """No per-key list: each field's default passes, and a value of no option's type is refused naming the field."""
    default = TrainConfig.from_options(data_dir="d", output_dir="o")
    for _, item in option_fields():
        TrainConfig.from_options(**{**default.to_dict(), item.name: default.to_dict()[item.name]})
        with pytest.raises(ValueError, match=f"^--{item.name.replace('_', '-')} "):
            TrainConfig.from_options(**{**default.to_dict(), item.name: object()})
    assert TrainConfig.from_options(data_dir="d", output_dir="o", alpha=8, resolution=None).network.alpha == 8  # an int is a number


# ---------------------------------------------------------------- relative paths in a TOML


def test_every_path_option_in_a_toml_is_relative_to_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "conf"
    (folder / "vae-here").mkdir(parents=True)
    (folder / "ckpt").mkdir()
    (folder / "start.safetensors").write_bytes(b"")
    (folder / "prompts.txt").write_text("a cat\n")
    toml = folder / "train.toml"
    toml.write_text(
        'data_dir = "."\ninit_lora = "start.safetensors"\nsample_prompts = "prompts.txt"\nvae = "vae-here"\nresume = "ckpt"\n'
        'model = "demo"\noutput_dir = "../out"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    options = load_toml(toml)
    for key, name in [("init_lora", "start.safetensors"), ("sample_prompts", "prompts.txt"), ("vae", "vae-here"), ("resume", "ckpt")]:
        assert options[key] == str(folder.resolve() / name), key
    assert options["output_dir"] == str((tmp_path / "out").resolve()) and options["model"] == "demo"
    config = TrainConfig.from_options(**options)  # --init-lora and --sample-prompts are found from here
    assert config.network.init_lora == str(folder.resolve() / "start.safetensors")
    # a value that may be a hub id or a keyword stays as written unless it starts with '.' or exists beside the file
    toml.write_text('data_dir = "."\nvae = "org/fixed-vae"\nresume = "latest"\nmodel = "./my-model"\n')
    options = load_toml(toml)
    assert (options["vae"], options["resume"]) == ("org/fixed-vae", "latest")
    toml.write_text('data_dir = "."\nresume = "step-00000500"\n')  # a checkpoint in the run's own checkpoints/
    assert load_toml(toml)["resume"] == "step-00000500"
    assert options["model"] == str(folder.resolve() / "my-model")


def test_path_options_are_one_list_from_the_field_metadata(tmp_path, monkeypatch):
    marked = {item.name for _, item in option_fields() if item.metadata.get("path")}
    assert marked == {
        "data_dir", "dataset_config", "reg_data", "mask_dir", "output_dir", "model", "model_config", "vae", "init_lora", "resume", "sample_prompts",
    }  # fmt: skip
    assert set(PATH_OPTIONS) == marked
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    written = to_toml(TrainConfig.from_options(data_dir="d", output_dir="o", resume="ckpt"))
    assert f"resume = {str((tmp_path / 'ckpt').resolve())!r}".replace("'", '"') in written


# ---------------------------------------------------------------- --name, the kohya file's stem


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("../escape", "--name '../escape' is not a file name: it cannot hold / or \\ (the folder is --output)"),
        ("a\\b", "--name 'a\\\\b' is not a file name: it cannot hold / or \\ (the folder is --output)"),
        ("..", "--name '..' is not a file name"),
        (".", "--name '.' is not a file name"),
        ("", "--name '' is empty: give the LoRA file's name, e.g. --name my_style"),
        ("  ", "--name '  ' is empty: give the LoRA file's name, e.g. --name my_style"),
        ("a:b", "--name 'a:b' holds ':', which file names cannot hold on every system (none of < > : \" / \\ | ? * or control characters)"),
        ("a\tb", "--name 'a\\tb' holds '\\t', which file names cannot hold on every system"),
        ("lora.", "--name 'lora.' ends in '.', which Windows drops from file names"),
        ("x" * 250, "--name is 250 characters long: the file xxxxxxxxxxxxxxxxxxxx..._ema.safetensors would pass the 255 bytes"),
        ("pytorch_lora_weights", "--name 'pytorch_lora_weights' is the stem of the diffusers file pytorch_lora_weights.safetensors"),
        ("PyTorch_LoRA_Weights", "--name 'PyTorch_LoRA_Weights' is the stem of the diffusers file pytorch_lora_weights.safetensors"),
        ("pytorch_lora_weights_ema", "--name 'pytorch_lora_weights_ema' is the stem of the diffusers file pytorch_lora_weights_ema"),
    ],
)
def test_a_name_that_is_not_a_file_stem_is_refused_before_training(tmp_path, capsys, name, says):
    with pytest.raises(ValueError) as caught:
        TrainConfig.from_options(data_dir="d", output_dir="o", name=name)
    assert str(caught.value).startswith(says) and "\n" not in str(caught.value)
    out = tmp_path / "run"
    argv = ["train", str(tmp_path / "data"), "--output", str(out), "--name", name, "--steps", "1", "--resolution", "64"]
    assert main([*argv, "--checkpoint-every", "0", "--validate-every", "0", "--sample-steps", "1"]) == 2
    assert one_error_line(capsys.readouterr().err) == f"sdlora train: error: {caught.value}"
    assert list(tmp_path.iterdir()) == []  # nothing written, inside the output folder or beside it


def test_the_refused_name_is_the_diffusers_files_stem():
    from sdlora.training.outputs import DIFFUSERS_FILE

    assert DIFFUSERS_FILE == DIFFUSERS_STEM + ".safetensors"
    for name in ("my style", "flat_poster", "v1.2", "über"):
        assert TrainConfig.from_options(data_dir="d", output_dir="o", name=name).run.name == name


# ---------------------------------------------------------------- [section] tables in a TOML


def test_a_toml_may_name_options_in_section_tables_or_at_the_top(tmp_path):
    path = tmp_path / "conf" / "train.toml"
    path.parent.mkdir()
    path.write_text('data_dir = "."\nsteps = 5\n\n[network]\nrank = 8\nalpha = 4.0\n\n[data]\nflip = true\n')
    config = TrainConfig.from_options(**load_toml(path), output_dir=str(tmp_path / "out"))
    assert (config.network.rank, config.network.alpha, config.optimization.steps, config.data.flip) == (8, 4.0, 5, True)
    assert config.data.data_dir == str(path.parent.resolve())  # a path in a table is relative to the file too


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[data]\nrank = 8\n", "rank is an option of [network], not of [data]: move it there or to the top level"),
        ("[network]\nrnak = 8\n", "unknown option 'rnak' in [network] (see sdlora train --help)"),
        ("rank = 4\n[network]\nrank = 8\n", "rank is given twice (at the top level and in [network]): keep one"),
        ('[network]\nrank = "8"\n', 'rank = "8" must be an integer (without quotes)'),
        ("[optimization]\nlr = true\n", "lr = true must be a number"),
        ('[data]\nflip = "yes"\n', 'flip = "yes" must be true or false (a TOML boolean, without quotes)'),
        ('[samples]\nvalidation_prompts = "a cat"\n', 'validation_prompts = "a cat" must be a list of strings, e.g. ["a cat"]'),
    ],
)
def test_section_tables_are_checked_in_one_line_naming_the_file(tmp_path, text, says):
    path = tmp_path / "train.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as caught:
        load_toml(path)
    assert str(caught.value) == f"{path}: {says}"


def test_the_written_config_toml_has_one_table_per_section_and_loads_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = TrainConfig.from_options(
        data_dir=str(tmp_path / "d"), output_dir=str(tmp_path / "o"), rank=8, validation_prompts=["a cat"], optimizer_args=["d_coef=2"]
    )
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    text = path.read_text()
    assert [line for line in text.splitlines() if line.startswith("[")] == [f"[{name}]" for name in SECTIONS]
    assert TrainConfig.from_options(**load_toml(path)) == config
