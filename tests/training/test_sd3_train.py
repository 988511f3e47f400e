"""Training SD3 on the tiny SD3 model by flow matching: a CLI run writes every output and its diffusers file loads in
diffusers as in sdlora; caches, resume, the two CLIPs' LoRAs at their own rates (never T5), the per-encoder dropout
with them, the presets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora.core import targets
from sdlora.inference.adapters import load_lora
from sdlora.models.tiny import build_tiny_sd3_pipeline
from sdlora.training import recipe


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models in one thread, here and in the CLI's process: on a busy 2-core machine two threads make each of
    the tiny VAE's and transformer's kernels up to 40x slower than one (measured), and the results are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


def _sd3_config(tiny_config, dataset, out, **overrides):
    return tiny_config(dataset, out, model="tiny-sd3", **{"validate_every": 0, **overrides})


def _lora(path):
    return load_file(str(path))


def _image(pipe) -> np.ndarray:
    return pipe(
        "a red circle", num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(1), output_type="np"
    ).images


# per-encoder dropout rates (kohya's clip_l/clip_g/t5_dropout_rate), different for each encoder
DROPOUT = dict(clip_l_dropout=0.3, clip_g_dropout=0.5, t5_dropout=0.7)
# one run both the CLIPs' test and the resume test read: 4 steps of batch 2 over 3 buckets of 2 (an epoch is 3 steps)
SHARED_RUN = dict(
    steps=4, checkpoint_every=0, samples=False, train_text_encoder=True, text_encoder_lr=3e-3, text_encoder_2_lr=7e-3, **DROPOUT
)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, make_dataset, tiny_config):
    """The shared SD3 run, step by step as `recipe.train` does it: its optimizer's learning rates, which trainable
    parameters changed, and its diffusers file."""
    folder = tmp_path_factory.mktemp("sd3-shared")
    dataset = make_dataset(folder / "data")
    run = recipe.setup(_sd3_config(tiny_config, dataset, folder / "run", **SHARED_RUN))
    before = {name: p.detach().clone() for name, p in run.trainable.items()}
    recipe.run_steps(run)
    changed = {name for name, p in run.trainable.items() if not torch.equal(p, before[name])}
    return {
        "dataset": dataset,
        "trained": run.model.trained,
        "lrs": [group["lr"] for group in run.optimizer.param_groups],
        "trainable": set(run.trainable),
        "changed": changed,
        "t5_frozen": not any(p.requires_grad for p in run.model.pipe.text_encoder_3.parameters()),
        "lora": recipe.save_outputs(run),
    }


@pytest.mark.slow  # a training run in a new process and three generations
def test_cli_run_writes_every_output_and_diffusers_loads_it_as_sdlora_does(tmp_path, dataset, run_sdlora):
    out = tmp_path / "run"
    run_sdlora(
        ["train", str(dataset), "--model", "tiny-sd3", "--output", str(out), "--steps", "2", "--rank", "4", "--alpha", "6",
         "--lr", "1e-2", "--resolution", "64", "--val-split", "0.2", "--validate-every", "1", "--sample-steps", "2",
         "--checkpoint-every", "1", "--train-text-encoder", "--timestep-sampling", "mode", "--flow-weighting", "cosmap"],
        tmp_path,
    )  # fmt: skip
    names = {p.name for p in out.iterdir()}
    assert {
        "pytorch_lora_weights.safetensors",
        "lora.safetensors",
        "config.toml",
        "metrics.jsonl",
        "README.md",
        "samples",
        "checkpoints",
    } <= names
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")) == ["step-00000001", "step-00000002"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and sum("val_loss" in r for r in rows) >= 2
    kohya = _lora(out / "lora.safetensors")
    assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn_qkv.") for k in kohya)  # SAI's MMDiT names, q/k/v fused
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_te2_") for k in kohya)
    assert not any(k.startswith("lora_te3_") for k in kohya)  # T5 never trains
    with safe_open(str(out / "lora.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "medium"
    diffusers_file = out / "pytorch_lora_weights.safetensors"
    assert {k.split(".", 1)[0] for k in _lora(diffusers_file)} == {"transformer", "text_encoder", "text_encoder_2"}
    assert 'timestep_sampling = "mode"' in (out / "config.toml").read_text()

    base = _image(build_tiny_sd3_pipeline())
    theirs_pipe = build_tiny_sd3_pipeline()
    theirs_pipe.load_lora_weights(str(diffusers_file))
    ours_pipe = build_tiny_sd3_pipeline()
    load_lora(ours_pipe, diffusers_file)
    theirs, ours = _image(theirs_pipe), _image(ours_pipe)
    assert np.abs(theirs - base).max() > 1e-3  # the LoRA changes the image
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.slow  # the shared training run with both CLIPs
def test_both_clips_train_at_their_own_rates_and_t5_stays_frozen(shared_run):
    assert shared_run["trained"] == ("transformer", "text_encoder", "text_encoder_2")
    assert shared_run["lrs"] == [1e-3, 3e-3, 7e-3]
    for component in ("transformer", "text_encoder", "text_encoder_2"):
        assert any(n.startswith(component + ".") for n in shared_run["changed"]), component
    assert not any(n.startswith("text_encoder_3.") for n in shared_run["trainable"])
    assert shared_run["t5_frozen"]


@pytest.mark.slow  # three short training runs
def test_cached_and_uncached_runs_train_the_same_sd3_lora_with_encoder_dropout(tmp_path, dataset, tiny_config):
    config = dict(steps=2, batch_size=2, checkpoint_every=0, samples=False)
    paths = [
        recipe.train(_sd3_config(tiny_config, dataset, tmp_path / cache, cache=cache, **config, **DROPOUT)) for cache in ("memory", "off")
    ]
    cached, uncached = (_lora(p) for p in paths)
    assert cached.keys() == uncached.keys() and any(k.startswith("transformer.") for k in cached)
    for key in cached:  # the dropout applies after the cache: the cached text is whole, each step zeroes its own parts
        torch.testing.assert_close(cached[key], uncached[key], rtol=1e-4, atol=1e-5, msg=key)
    whole = _lora(recipe.train(_sd3_config(tiny_config, dataset, tmp_path / "whole", **config)))
    assert any(not torch.allclose(whole[key], cached[key], atol=1e-6) for key in cached)  # the dropout changed what trained


def test_encoder_dropout_is_refused_without_sd3s_encoders(tmp_path, dataset, tiny_config):
    from sdlora.errors import UserError

    with pytest.raises(UserError, match=r"^--clip-l-dropout, --t5-dropout: per-encoder dropout is for SD3.*use --caption-dropout$"):
        recipe.setup(tiny_config(dataset, tmp_path / "sd1", clip_l_dropout=0.2, t5_dropout=0.1))
    with pytest.raises(UserError, match="--t5-dropout with --no-t5"):
        recipe.setup(_sd3_config(tiny_config, dataset, tmp_path / "no-t5", t5_dropout=0.1, no_t5=True))
    with pytest.raises(UserError, match=r"--clip-g-dropout 1.5 is invalid: it must be in \[0, 1\]"):
        _sd3_config(tiny_config, dataset, tmp_path / "rate", clip_g_dropout=1.5)


@pytest.mark.slow  # the shared run again: a step, then resumed mid-epoch across the epoch's end
def test_resume_gives_the_same_sd3_lora_bit_for_bit(tmp_path, shared_run, tiny_config):
    options = {**SHARED_RUN, "checkpoint_every": 1}
    recipe.train(_sd3_config(tiny_config, shared_run["dataset"], tmp_path / "resumed", **{**options, "steps": 1}))
    resumed = recipe.train(_sd3_config(tiny_config, shared_run["dataset"], tmp_path / "resumed", resume="latest", **options))
    a, b = _lora(shared_run["lora"]), _lora(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mmdit_presets(tiny_sd3_pipe):
    transformer = tiny_sd3_pipe.transformer
    attn = set(targets.unet_target_modules(transformer, "attn"))
    assert {"transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.attn2.to_q"} <= attn
    assert len(attn) == 3 * 8 + 4 - 1  # 8 per joint block, attn2's 4 in block 0, no to_add_out in the last (context_pre_only)
    attn_ff = set(targets.unet_target_modules(transformer, "attn-ff"))
    assert attn < attn_ff and "transformer_blocks.1.ff_context.net.2" in attn_ff
    every = set(targets.unet_target_modules(transformer, "all"))
    assert attn_ff < every and "transformer_blocks.0.norm1.linear" in every and "proj_out" not in every


def test_sd3_refuses_diffusion_options(tmp_path, dataset, tiny_config):
    from sdlora.errors import UserError

    with pytest.raises(UserError, match="--snr-gamma is for diffusion"):
        recipe.setup(_sd3_config(tiny_config, dataset, tmp_path / "run", snr_gamma=5.0))
    # kohya's SD3 file fuses q/k/v, which only a plain LoRA fits in its own form: the other kinds are refused before training
    for kind in ("loha", "lokr", "dora"):
        with pytest.raises(UserError, match=f"--kind {kind} on SD3.*fuses q, k and v .* --kind lora"):
            recipe.setup(_sd3_config(tiny_config, dataset, tmp_path / kind, kind=kind))
        assert not (tmp_path / kind / "checkpoints").exists()


def test_lora_blocks_train_only_the_chosen_joint_blocks(tmp_path, dataset, tiny_config):
    run = recipe.setup(_sd3_config(tiny_config, dataset, tmp_path / "run", lora_blocks="0,2", preset="all", samples=False))
    blocks = {name.split(".")[2] for name in run.trainable}  # transformer.transformer_blocks.N....
    assert blocks == {"0", "2"} and all(name.startswith("transformer.transformer_blocks.") for name in run.trainable)
    from sdlora.errors import UserError

    with pytest.raises(UserError, match="block 3 is beyond this transformer's 3 joint blocks"):
        recipe.setup(_sd3_config(tiny_config, dataset, tmp_path / "beyond", lora_blocks="1-3"))
