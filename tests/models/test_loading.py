"""models.py and tiny.py: the tiny offline pipeline and model loading from every kind of source."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from sdlora.errors import UserError
from sdlora.models.loading import _check_single_file_vae, load_pipeline, peek_family, peek_resolution, write_tiny_model
from sdlora.models.tiny import MAX_TOKENS, tiny_clip_vocab, tiny_tokenizer


def test_tiny_tokenizer_gives_words_their_own_ids():
    tokenizer = tiny_tokenizer()
    ids = tokenizer(["a photo of a cat", "a painting of a dog"]).input_ids
    assert ids[0][0] == tokenizer.bos_token_id and ids[0][-1] == tokenizer.eos_token_id
    cat, dog = ids[0][-2], ids[1][-2]
    assert cat != dog and tokenizer.unk_token_id not in (cat, dog)
    assert len(set(ids[0][1:-1])) == 4  # a, photo, of, cat (a twice)
    assert tokenizer.model_max_length == MAX_TOKENS
    assert len(tokenizer("x", padding="max_length").input_ids) == MAX_TOKENS


def test_tiny_vocab_is_deterministic():
    tiny_clip_vocab.cache_clear()
    first = tiny_clip_vocab()
    tiny_clip_vocab.cache_clear()
    assert tiny_clip_vocab() == first


def test_tiny_model_folder_loads_and_generates_64px(tiny_model_dir):
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert (tiny_model_dir / part).exists()
    # transformers 4 reads these two files
    assert json.loads((tiny_model_dir / "tokenizer" / "vocab.json").read_text())["<|startoftext|>"] == 0
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    scheduler = pipe.scheduler.config
    assert scheduler.beta_schedule == "scaled_linear" and scheduler.beta_start == 0.00085 and scheduler.beta_end == 0.012
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    image = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0


def test_tiny_model_is_reproducible_from_seed(tmp_path):
    first = write_tiny_model(tmp_path / "a")
    second = write_tiny_model(tmp_path / "b")
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (first / name).read_bytes() == (second / name).read_bytes()
    third = write_tiny_model(tmp_path / "c", seed=1)
    assert (first / name).read_bytes() != (third / name).read_bytes()


def test_load_pipeline_tiny_and_folder_match(tiny_model_dir):
    from_memory = load_pipeline("tiny")
    from_folder = load_pipeline(str(tiny_model_dir))
    for name, tensor in from_memory.unet.state_dict().items():
        assert torch.equal(tensor, from_folder.unet.state_dict()[name]), name
    assert load_pipeline("tiny", dtype=torch.float16).unet.dtype == torch.float16


def test_load_pipeline_errors(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_pipeline(str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(FileNotFoundError, match="no unet/"):
        load_pipeline(str(broken))
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_pipeline(str(tmp_path / "missing.safetensors"))
    pickle_file = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickle_file)
    with pytest.raises(ValueError, match="allow-pickle"):
        load_pipeline(str(pickle_file))


def test_a_single_file_vae_must_be_ldm_named(tmp_path, tiny_sdxl_dir, write_sdxl_single_file):
    checkpoint = write_sdxl_single_file(tiny_sdxl_dir, tmp_path / "xl.safetensors")  # its VAE under diffusers' names
    with pytest.raises(ValueError, match=r"xl.safetensors: the VAE keys \(first_stage_model.\*\) are not in the LDM layout"):
        load_pipeline(str(checkpoint), config=str(tiny_sdxl_dir))
    tensors = load_file(checkpoint)
    save_file(
        {key: value for key, value in tensors.items() if not key.startswith("first_stage_model.")}, str(tmp_path / "no-vae.safetensors")
    )
    with pytest.raises(ValueError, match=r"no-vae.safetensors has no VAE \(first_stage_model.\* or vae.\* keys\)"):
        load_pipeline(str(tmp_path / "no-vae.safetensors"), config=str(tiny_sdxl_dir))
    ldm = [f"first_stage_model.{part}conv1.weight" for part in ("encoder.down.0.block.0.", "encoder.mid.block_1.", "decoder.up.0.block.0.")]
    _check_single_file_vae([*ldm, "first_stage_model.decoder.mid.block_1.conv1.weight"], tmp_path / "ldm.safetensors")  # passes


def _damaged_copy(tiny_model_dir, tmp_path, damage) -> str:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    damage(folder)
    return str(folder)


def _truncate(file) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _edit_config(file, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: _truncate(m / "text_encoder/model.safetensors"), r"text_encoder/model.safetensors: tensor '.*' ends past the end"),
        (
            lambda m: (m / "tokenizer/vocab.json").write_text("{not json"),
            r"tokenizer/vocab.json is not valid JSON \(.*\): the model folder is damaged",
        ),
        (lambda m: (m / "scheduler/scheduler_config.json").write_bytes(b"\xff\xfe"), "scheduler_config.json is not valid JSON"),
        (
            lambda m: _edit_config(m / "unet/config.json", cross_attention_dim=7),
            r"unet: UNet weight .*attn2.to_k.weight is \[64, 32\] but its config.json makes it \[64, 7\]",
        ),
        (
            lambda m: _edit_config(m / "text_encoder/config.json", intermediate_size=41),
            r"could not load the model folder .*model \(RuntimeError: .*\): is a file in it damaged or of another model\?",
        ),
    ],
    ids=[
        "truncated-text-encoder",
        "vocab-not-json",
        "scheduler-config-not-utf8",
        "unet-config-of-another-model",
        "text-encoder-config-of-another-model",
    ],
)
def test_a_damaged_model_folder_is_a_user_error_naming_the_file(tiny_model_dir, tmp_path, damage, message):
    with pytest.raises(UserError, match=message):
        load_pipeline(_damaged_copy(tiny_model_dir, tmp_path, damage))


def test_a_pickle_checkpoint_diffusers_cannot_use_is_a_user_error(tiny_model_dir, tmp_path):
    torch.save({"state_dict": {"foo": torch.zeros(3)}}, tmp_path / "foo.ckpt")
    with pytest.raises(
        UserError, match=r"could not load single-file checkpoint .*foo.ckpt \(SingleFileComponentError: .*\): is it a Stable"
    ):
        load_pipeline(str(tmp_path / "foo.ckpt"), config=str(tiny_model_dir), allow_pickle=True)


def test_hub_id_offline_says_to_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="local diffusers folder"):
        load_pipeline("someone/some-sd15-model")


@pytest.mark.slow  # over a second: subprocesses or several training runs
def test_cli_tiny_model(tmp_path):
    out = tmp_path / "tiny"
    result = subprocess.run([sys.executable, "-m", "sdlora", "tiny-model", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sdlora-tmp")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_unet_equals_from_pretrained(tiny_model_dir, dtype):
    from diffusers import UNet2DConditionModel

    from sdlora.models.loading import load_unet_streaming

    streamed = load_unet_streaming(tiny_model_dir / "unet", dtype)
    reference = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet", torch_dtype=dtype)
    reference_state = reference.state_dict()
    assert streamed.state_dict().keys() == reference_state.keys()
    for name, tensor in streamed.state_dict().items():
        assert tensor.dtype == dtype and not tensor.is_meta, name
        assert torch.equal(tensor, reference_state[name]), name
    assert load_pipeline(str(tiny_model_dir), dtype=dtype).unet.dtype == dtype


def test_a_model_folder_whose_part_holds_only_a_pickle_needs_allow_pickle(tiny_model_dir, tmp_path, capsys):
    """A folder whose text_encoder/ holds only pytorch_model.bin: unpickling can run code, as a .ckpt's can."""
    from sdlora.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = next((model / "text_encoder").glob("*.safetensors"))
    torch.save(load_file(weights), model / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ValueError, match=r"pytorch_model.bin is a pickle file.*--allow-pickle"):
        load_pipeline(str(model))
    assert main(["generate", "--model", str(model), "--prompt", "a cat", "--steps", "1", "--out", str(tmp_path / "images")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pytorch_model.bin" in err and not (tmp_path / "images").exists()
    pipe = load_pipeline(str(model), allow_pickle=True)  # weights-only, as every pickle sdlora reads
    saved = load_file(tiny_model_dir / "text_encoder" / weights.name)
    loaded = pipe.text_encoder.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in saved.items() if key in loaded) and saved.keys() & loaded.keys()


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-sd3"])
def test_peek_family_and_resolution_of_a_builtin_model_are_what_it_builds(model, request):
    pipe = request.getfixturevalue({"tiny": "tiny_pipe", "tiny-sdxl": "tiny_sdxl_pipe", "tiny-sd3": "tiny_sd3_pipe"}[model])
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    assert peek_resolution(model) == denoiser.config.sample_size * pipe.vae_scale_factor
    assert peek_family(model).name == {"tiny": "sd1", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3"}[model]
