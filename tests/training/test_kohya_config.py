"""`sdlora train --kohya-config`: sd-scripts' --config_file TOML and kohya_ss's JSON read with kohya's meanings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdlora.cli import main
from sdlora.training.config import TrainConfig
from sdlora.training.data import ImageRecord
from sdlora.training.datasets import DatasetSpec, TrainingData, record_buckets
from sdlora.training.kohya_config import KEYS, command_line, read_kohya_config

# sd-scripts docs/train_network_README-ja.md ("コマンドラインの例", the train_network.py example), as --config_file keys,
# with docs/train_network_README-ja.md's LoCon line `--network_args "conv_dim=4" "conv_alpha=1"`
SD1_EXAMPLE = """
pretrained_model_name_or_path = "tiny"
dataset_config = "datasets.toml"
output_dir = "out"
output_name = "my_lora"
save_model_as = "safetensors"
prior_loss_weight = 1.0
max_train_steps = 400
learning_rate = 1e-4
optimizer_type = "AdamW8bit"
xformers = true
mixed_precision = "fp16"
cache_latents = true
gradient_checkpointing = true
network_module = "networks.lora"
network_args = ["conv_dim=4", "conv_alpha=1"]
"""

# sd-scripts docs/train_lllite_README.md's SDXL .toml example (the LLLite-only cond_emb_dim left out, network_module
# and network_args added as in docs/train_network_README-ja.md; save_every_n_epochs as steps: sdlora counts in steps)
SDXL_EXAMPLE = """
pretrained_model_name_or_path = "tiny-sdxl"
max_train_epochs = 12
max_data_loader_n_workers = 4
persistent_data_loader_workers = true
seed = 42
gradient_checkpointing = true
mixed_precision = "bf16"
save_precision = "bf16"
full_bf16 = true
optimizer_type = "adamw8bit"
learning_rate = 2e-4
xformers = true
output_dir = "out"
output_name = "output_name"
save_every_n_steps = 100
save_model_as = "safetensors"
vae_batch_size = 4
cache_latents = true
cache_latents_to_disk = true
cache_text_encoder_outputs = true
cache_text_encoder_outputs_to_disk = true
network_dim = 64
network_train_unet_only = true
network_module = "lycoris.kohya"
network_args = ["algo=locon", "conv_dim=8", "conv_alpha=4"]
dataset_config = "datasets.toml"
"""


def _write(tmp_path: Path, text: str, name: str = "kohya.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    (tmp_path / "datasets.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img'\n")
    return path


def test_sd1_example_as_kohya_means_it(tmp_path):
    kohya = read_kohya_config(_write(tmp_path, SD1_EXAMPLE))
    config = TrainConfig.from_options(**kohya.options)
    assert config.base.model == "tiny"
    assert config.data.dataset_config == "datasets.toml" and config.data.data_dir == ""
    assert (config.run.output_dir, config.run.name) == ("out", "my_lora")
    assert (config.optimization.steps, config.optimization.lr, config.optimization.optimizer) == (400, 1e-4, "adamw8bit")
    assert config.optimization.text_encoder_lr == 1e-4  # kohya: the text encoder trains at learning_rate, not lr / 2
    assert config.network.train_text_encoder  # kohya trains it unless network_train_unet_only
    # networks.lora without network_dim: kohya's dim 4 and alpha 1; conv_dim adds the 3x3 convs
    assert (config.network.rank, config.network.alpha) == (4, 1.0)
    assert (config.network.preset, config.network.conv_rank, config.network.conv_alpha) == ("all", 4, 1.0)
    assert config.base.mixed_precision == "fp16" and config.base.gradient_checkpointing is True
    assert config.data.buckets is False and config.data.caption_extension == ".caption"  # kohya's defaults
    assert config.objective.prediction_type == "epsilon"
    assert config.run.checkpoint_every == 0  # kohya saves nothing before the end unless told
    assert config.optimization.weight_decay == 1e-2 and config.optimization.optimizer_args == []
    assert kohya.ignored == ("xformers", "cache_latents")


def test_sdxl_example_with_lycoris_locon(tmp_path):
    kohya = read_kohya_config(_write(tmp_path, SDXL_EXAMPLE))
    config = TrainConfig.from_options(**kohya.options)
    assert (config.optimization.epochs, config.optimization.lr, config.run.seed) == (12, 2e-4, 42)
    assert (config.base.mixed_precision, config.base.full_bf16, config.run.save_precision) == ("bf16", True, "bf16")
    assert (config.network.rank, config.network.alpha, config.network.train_text_encoder) == (64, 1.0, False)
    assert (config.network.preset, config.network.conv_rank, config.network.conv_alpha) == ("all", 8, 4.0)
    assert (config.data.cache, config.data.vae_batch_size, config.run.checkpoint_every) == ("disk", 4, 100)
    assert set(kohya.ignored) == {
        "max_data_loader_n_workers", "persistent_data_loader_workers", "xformers", "cache_latents",
        "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('resolution = "512,512"', {"resolution": 512}),
        ("resolution = 768", {"resolution": 768}),
        (
            "unet_lr = 3e-4\nlearning_rate = 1e-4\ntext_encoder_lr = [5e-5, 2e-5]",
            {"lr": 3e-4, "text_encoder_lr": 5e-5, "text_encoder_2_lr": 2e-5},
        ),
        ("max_train_steps = 1000\nlr_warmup_steps = 0.1", {"lr_warmup_steps": 100}),  # a fraction of the steps
        ("v_parameterization = true", {"prediction_type": "v_prediction"}),
        (
            'optimizer_type = "Prodigy"\nlearning_rate = 1.0',
            {
                "optimizer": "prodigy",
                "weight_decay": 0.0,
                "optimizer_args": ["d_coef=1.0", "use_bias_correction=False", "safeguard_warmup=False"],
            },
        ),
        (
            'optimizer_type = "Lion"\noptimizer_args = ["weight_decay=0.1", "betas=0.9,0.99"]',
            {"optimizer": "lion", "weight_decay": 0.1, "optimizer_args": ["betas=0.9,0.99"]},
        ),
        (
            'optimizer_type = "AdaFactor"\noptimizer_args = ["relative_step=False"]',
            {"optimizer": "adafactor", "optimizer_args": ["relative_step=False", "scale_parameter=True", "warmup_init=False"]},
        ),
        ("save_every_n_steps = 200\nsave_last_n_steps = 600", {"checkpoint_every": 200, "keep_checkpoints": 3}),
        ("random_crop = true\nflip_aug = true", {"crop": "random", "flip": True}),
        ('train_data_dir = "img"\nreg_data_dir = "reg"', {"data_dir": "img", "reg_data": "reg"}),
        ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=loha"]', {"kind": "loha", "preset": "attn-ff"}),
        ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "factor=-1"]', {"kind": "lokr"}),
        (
            'network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "factor=8", "decompose_both=True", "conv_dim=4", '
            '"use_tucker=True", "rank_dropout=0.1", "module_dropout=0.05", "rank_dropout_scale=True"]',
            {
                "kind": "lokr",
                "lokr_factor": 8,
                "lokr_decompose_both": True,
                "use_tucker": True,
                "rank_dropout": 0.1,
                "module_dropout": 0.05,
            },
        ),
        (
            'network_module = "lycoris.kohya"\nnetwork_args = ["algo=loha", "conv_dim=4", "use_cp=True"]',
            {"kind": "loha", "use_tucker": True},
        ),
        ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=locon", "dora_wd=True", "conv_dim=4"]', {"kind": "dora", "conv_rank": 4}),
        (  # lycoris.kohya's wd_on_output=False: DoRA's magnitude per input column
            'network_module = "lycoris.kohya"\nnetwork_args = ["algo=lora", "dora_wd=True", "wd_on_output=False"]',
            {"kind": "dora", "dora_axis": "input"},
        ),
        ('network_module = "networks.lora"', {"kind": "lora"}),
    ],
)
def test_keys_whose_meaning_differs_are_converted(tmp_path, text, expected):
    options = read_kohya_config(_write(tmp_path, text)).options
    assert {key: options[key] for key in expected} == expected


def test_tables_are_flattened_as_sd_scripts_reads_them(tmp_path):
    options = read_kohya_config(_write(tmp_path, "[model_arguments]\nnetwork_dim = 8\n[training_arguments]\nseed = 7\n")).options
    assert (options["rank"], options["seed"]) == (8, 7)


def test_kohya_ss_json(tmp_path):
    gui = {
        "LoRA_type": "Kohya LoCon", "conv_dim": 8, "conv_alpha": 2, "max_resolution": "512,512",
        "optimizer": "AdamW", "lr_warmup": 10, "max_train_steps": 500, "xformers": "sdpa", "model_list": "custom",
        "train_data_dir": "img", "output_name": "gui_lora", "network_dim": 16, "network_alpha": 8, "seed": "",
        "num_cpu_threads_per_process": 2, "noise_offset_type": "Original", "noise_offset": 0.05,
        "multires_noise_iterations": 6, "additional_parameters": "", "stop_text_encoder_training": 0,
    }  # fmt: skip
    options = read_kohya_config(_write(tmp_path, json.dumps(gui), "kohya.json")).options
    assert (options["preset"], options["conv_rank"], options["conv_alpha"]) == ("all", 8, 2.0)
    assert (options["steps"], options["resolution"], options["lr_warmup_steps"]) == (500, 512, 50)
    assert (options["rank"], options["alpha"], options["name"]) == (16, 8.0, "gui_lora")
    assert options["noise_offset"] == 0.05 and "multires_noise_iterations" not in options  # the GUI's Original noise
    assert "seed" not in options  # "" is the GUI's unset: sdlora's seed 42
    options = read_kohya_config(_write(tmp_path, json.dumps({"epoch": 3, "optimizer": "Lion"}), "kohya.json")).options
    assert (options["epochs"], options["optimizer"], options["weight_decay"]) == (3, "lion", 0.0)


# kohya_ss's own test/config/locon-AdamW8bit-toml.json (bmaltais/kohya_ss), as the GUI saves it: numbers as text,
# "" / 0 / false for "not set"; clip_skip 2 made 1 (sdlora refuses 2, tested below) and paths made relative
KOHYA_SS_LOCON = {
    "LoRA_type": "Standard", "LyCORIS_preset": "full", "adaptive_noise_scale": 0, "additional_parameters": "",
    "block_alphas": "", "block_dims": "", "block_lr_zero_threshold": "", "bucket_no_upscale": True, "bucket_reso_steps": 64,
    "cache_latents": True, "cache_latents_to_disk": False, "caption_dropout_every_n_epochs": 0.0, "caption_dropout_rate": 0.05,
    "caption_extension": "", "clip_skip": 1, "color_aug": False, "constrain": 0.0, "conv_alpha": 1, "conv_block_alphas": "",
    "conv_block_dims": "", "conv_dim": 1, "dataset_config": "test/config/dataset.toml", "debiased_estimation_loss": False,
    "decompose_both": False, "dim_from_weights": False, "down_lr_weight": "", "enable_bucket": True, "epoch": 1, "factor": -1,
    "flip_aug": False, "fp8_base": False, "full_bf16": False, "full_fp16": False, "gpu_ids": "", "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False, "keep_tokens": "0", "learning_rate": 0.0005, "log_tracker_config": "", "log_tracker_name": "",
    "logging_dir": "./test/logs", "lora_network_weights": "", "lr_scheduler": "constant", "lr_scheduler_args": "",
    "lr_scheduler_num_cycles": "", "lr_scheduler_power": "", "lr_warmup": 0, "max_bucket_reso": 2048,
    "max_data_loader_n_workers": "0", "max_grad_norm": 1, "max_resolution": "512,512", "max_timestep": 1000,
    "max_token_length": "75", "max_train_epochs": "", "max_train_steps": "", "mem_eff_attn": False, "mid_lr_weight": "",
    "min_bucket_reso": 256, "min_snr_gamma": 0, "min_timestep": 0, "mixed_precision": "bf16",
    "model_list": "runwayml/stable-diffusion-v1-5", "module_dropout": 0, "multi_gpu": False, "multires_noise_discount": 0,
    "multires_noise_iterations": 0, "network_alpha": 1, "network_dim": 8, "network_dropout": 0, "noise_offset": 0.05,
    "noise_offset_type": "Original", "num_cpu_threads_per_process": 2, "num_machines": 1, "num_processes": 1,
    "optimizer": "AdamW8bit", "optimizer_args": "", "output_dir": "./test/output", "output_name": "locon-AdamW8bit-toml",
    "persistent_data_loader_workers": False, "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5",
    "prior_loss_weight": 1.0, "random_crop": False, "rank_dropout": 0, "rank_dropout_scale": False, "reg_data_dir": "",
    "rescaled": False, "resume": "", "sample_every_n_epochs": 0, "sample_every_n_steps": 25,
    "sample_prompts": "a painting of a gas mask , by darius kawasaki", "sample_sampler": "euler_a", "save_every_n_epochs": 1,
    "save_every_n_steps": 0, "save_last_n_steps": 0, "save_last_n_steps_state": 0, "save_model_as": "safetensors",
    "save_precision": "fp16", "save_state": False, "scale_v_pred_loss_like_noise_pred": False, "scale_weight_norms": 0,
    "sdxl": False, "sdxl_cache_text_encoder_outputs": False, "sdxl_no_half_vae": True, "seed": "1234", "shuffle_caption": False,
    "stop_text_encoder_training": 0, "text_encoder_lr": 0.0, "train_batch_size": 4, "train_data_dir": "./test/img",
    "train_norm": False, "train_on_input": True, "training_comment": "", "unet_lr": 0.0, "unit": 1, "up_lr_weight": "",
    "use_cp": False, "use_scalar": False, "use_tucker": False, "use_wandb": False, "v2": False, "v_parameterization": False,
    "v_pred_like_loss": 0, "vae": "", "vae_batch_size": 0, "wandb_api_key": "", "wandb_run_name": "", "weighted_captions": False,
    "xformers": "xformers",
}  # fmt: skip


def test_kohya_ss_saved_json_as_the_gui_runs_it(tmp_path):
    options = read_kohya_config(_write(tmp_path, json.dumps(KOHYA_SS_LOCON), "kohya.json")).options
    config = TrainConfig.from_options(**options)
    # Standard: networks.lora, conv_dim unused (lora_gui.py passes it for Kohya LoCon only)
    assert (config.network.preset, config.network.conv_rank, config.network.rank, config.network.alpha) == ("attn-ff", None, 8, 1.0)
    # unet_lr and text_encoder_lr 0: the GUI passes neither, so both train at learning_rate
    assert (config.optimization.lr, config.optimization.lr_of("text_encoder"), config.optimization.optimizer) == (5e-4, 5e-4, "adamw8bit")
    assert (config.optimization.epochs, config.run.seed, config.data.keep_tokens, config.data.batch_size) == (1, 1234, 0, 4)
    assert config.data.dataset_config == "test/config/dataset.toml" and config.data.data_dir == ""  # dataset_config wins
    assert (config.data.bucket_no_upscale, config.data.max_bucket_reso, config.data.buckets) == (True, 2048, True)
    assert (config.data.caption_dropout, config.objective.noise_offset, config.objective.multires_noise_iterations) == (0.05, 0.05, 0)
    assert config.samples.validation_prompts == ["a painting of a gas mask , by darius kawasaki"]
    assert (config.samples.validate_every, config.samples.sampler, config.run.save_precision) == (25, "euler_a", "fp16")
    assert config.data.caption_extension == ".caption"  # "" is unset: sd-scripts' default
    locon = KOHYA_SS_LOCON | {"LoRA_type": "Kohya LoCon", "conv_dim": 4, "conv_alpha": 2, "rank_dropout": 0.1}
    options = read_kohya_config(_write(tmp_path, json.dumps(locon), "kohya.json")).options
    assert (options["preset"], options["conv_rank"], options["conv_alpha"], options["rank_dropout"]) == ("all", 4, 2.0, 0.1)
    lycoris = KOHYA_SS_LOCON | {"LoRA_type": "LyCORIS/LoCon", "rank_dropout": 0.1}  # LyCORIS's own: not kohya's
    with pytest.raises(ValueError, match="network_args rank_dropout=0.1 is not supported by sdlora's training yet with lycoris.kohya"):
        read_kohya_config(_write(tmp_path, json.dumps(lycoris), "kohya.json"))
    with pytest.raises(ValueError, match="LoRA_type = 'LyCORIS/iA3' is not supported"):
        read_kohya_config(_write(tmp_path, json.dumps(KOHYA_SS_LOCON | {"LoRA_type": "LyCORIS/iA3"}), "kohya.json"))


def test_kohya_ss_lycoris_types_train_their_algo(tmp_path):
    """lora_gui.py's LyCORIS/LoHa and LyCORIS/LoKr: lycoris.kohya with algo=loha / lokr and the GUI's LyCORIS fields
    (LoKr's factor, decompose_both and use_cp; dora_wd on LyCORIS/LoCon), saved as the GUI saves them."""
    gui = KOHYA_SS_LOCON | {"conv_dim": 4, "conv_alpha": 2, "module_dropout": "0.05", "use_tucker": True}
    options = read_kohya_config(_write(tmp_path, json.dumps(gui | {"LoRA_type": "LyCORIS/LoHa"}), "kohya.json")).options
    assert (options["kind"], options["preset"], options["conv_rank"], options["use_tucker"], options["module_dropout"]) == (
        "loha", "all", 4, True, 0.05,
    )  # fmt: skip
    lokr = gui | {"LoRA_type": "LyCORIS/LoKr", "factor": "8", "decompose_both": True, "use_tucker": False, "use_cp": True}
    options = read_kohya_config(_write(tmp_path, json.dumps(lokr), "kohya.json")).options
    assert (options["kind"], options["lokr_factor"], options["lokr_decompose_both"], options["use_tucker"]) == ("lokr", 8, True, True)
    config = TrainConfig.from_options(**options)
    assert (config.network.kind, config.network.lokr_factor, config.network.conv_rank) == ("lokr", 8, 4)
    # the GUI's factor -1 (its default) is LyCORIS's default too; LyCORIS/LoCon with DoRA checked trains DoRA
    options = read_kohya_config(
        _write(tmp_path, json.dumps(gui | {"LoRA_type": "LyCORIS/LoKr", "use_tucker": False}), "kohya.json")
    ).options
    assert options["kind"] == "lokr" and "lokr_factor" not in options
    dora = gui | {"LoRA_type": "LyCORIS/LoCon", "use_tucker": False, "module_dropout": 0, "dora_wd": True}
    assert read_kohya_config(_write(tmp_path, json.dumps(dora), "kohya.json")).options["kind"] == "dora"
    with pytest.raises(ValueError, match="dora_wd=True with algo=loha"):
        read_kohya_config(_write(tmp_path, json.dumps(dora | {"LoRA_type": "LyCORIS/LoHa"}), "kohya.json"))


# sd3_train_network.py's config (its keys: library/train_util.py and sd3_train_utils.py's add_sd3_training_arguments)
SD3_EXAMPLE = """
pretrained_model_name_or_path = "tiny-sd3"
train_data_dir = "img"
output_dir = "out"
network_module = "networks.lora_sd3"
network_args = ["train_block_indices=0-1"]
weighting_scheme = "sigma_sqrt"
clip_l_dropout_rate = 0.1
clip_g_dropout_rate = 0.2
t5_dropout_rate = 0.3
t5xxl_max_token_length = 128
logit_std = 1.5
"""


def test_sd3_config_maps_to_sdlora_options_with_kohyas_sd3_defaults(tmp_path):
    kohya = read_kohya_config(_write(tmp_path, SD3_EXAMPLE))
    config = TrainConfig.from_options(**kohya.options)
    # networks.lora_sd3 adapts every Linear of the joint blocks: --preset all (tests/core/test_targets.py counts them)
    assert (config.network.preset, config.network.lora_blocks, config.network.kind) == ("all", "0-1", "lora")
    # sigma_sqrt: uniform sigmas (kohya's density for every scheme but logit_normal and mode), weighted 1 / sigma^2
    assert (config.objective.timestep_sampling, config.objective.flow_weighting) == ("uniform", "sigma_sqrt")
    assert config.objective.flow_shift == 1.0  # kohya's training_shift default: no shift
    assert config.objective.prediction_type is None and config.objective.logit_std == 1.5
    assert (config.data.clip_l_dropout, config.data.clip_g_dropout, config.data.t5_dropout) == (0.1, 0.2, 0.3)
    assert config.base.t5_max_length == 128
    defaults = read_kohya_config(_write(tmp_path, 'pretrained_model_name_or_path = "tiny-sd3"\ntraining_shift = 3.0\n')).options
    assert (defaults["timestep_sampling"], defaults["flow_shift"], defaults["t5_max_length"], defaults["preset"]) == (
        "uniform",
        3.0,
        256,
        "all",
    )
    for scheme, expected in {"logit_normal": ("logit_normal", "none"), "mode": ("mode", "none"), "cosmap": ("uniform", "cosmap"),
                             "none": ("uniform", "none")}.items():  # fmt: skip
        options = read_kohya_config(_write(tmp_path, SD3_EXAMPLE.replace("sigma_sqrt", scheme))).options
        assert (options["timestep_sampling"], options["flow_weighting"]) == expected, scheme
    # in an SD1/SDXL config (sd-scripts' output_config writes every argument) the flow-matching keys change nothing
    sd1 = read_kohya_config(_write(tmp_path, 'weighting_scheme = "uniform"\nmode_scale = 1.29\n'))
    assert sd1.ignored == ("weighting_scheme", "mode_scale") and "timestep_sampling" not in sd1.options
    assert sd1.options["prediction_type"] == "epsilon"


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('clip_l = "clip_l.safetensors"', "clip_l = 'clip_l.safetensors' is not carried out by sdlora: sdlora loads SD3's text encoders"),
        ('t5xxl = "t5xxl_fp16.safetensors"', "give pretrained_model_name_or_path a diffusers folder or a single file with its encoders"),
        ("apply_t5_attn_mask = true", "apply_t5_attn_mask = True is not carried out by sdlora: sdlora encodes SD3's text"),
        ("apply_lg_attn_mask = true", "without attention masks"),
        ("pos_emb_random_crop_rate = 0.2", "the positional embeddings' random crop is not supported"),
        ('network_args = ["emb_dims=[4,0,0,0,0,0]"]', "network_args emb_dims=[4,0,0,0,0,0] is not supported by sdlora's training yet"),
        (
            'weighting_scheme = "lognorm"',
            "weighting_scheme = 'lognorm' must be one of uniform, none, logit_normal, mode, sigma_sqrt, cosmap",
        ),
    ],
)
def test_sd3_keys_sdlora_cannot_carry_out_are_one_line(tmp_path, line, says):
    text = 'network_module = "networks.lora_sd3"\n' + line + "\n"
    with pytest.raises(ValueError, match=re.escape(says)):
        read_kohya_config(_write(tmp_path, text))
    with pytest.raises(ValueError, match="network_module = 'networks.lora' with SD3's keys"):
        read_kohya_config(_write(tmp_path, 'network_module = "networks.lora"\ntraining_shift = 3.0\n'))


def test_kohya_ss_json_with_sd3_checkbox(tmp_path):
    gui = KOHYA_SS_LOCON | {
        "sd3_checkbox": True, "weighting_scheme": "logit_normal", "logit_mean": 0.5, "logit_std": 1, "mode_scale": 1.29,
        "sd3_clip_l_dropout_rate": 0.25, "clip_g_dropout_rate": 0.5, "sd3_t5_dropout_rate": "0.75", "t5xxl_max_token_length": "200",
        "sd3_clip_l": "", "sd3_t5xxl": "", "clip_g": "", "sd3_text_encoder_batch_size": 4, "t5xxl_dtype": "bf16",
        "pretrained_model_name_or_path": "tiny-sd3", "flux1_checkbox": False, "discrete_flow_shift": 3.0, "guidance_scale": 3.5,
    }  # fmt: skip
    kohya = read_kohya_config(_write(tmp_path, json.dumps(gui), "kohya.json"))
    config = TrainConfig.from_options(**kohya.options)
    assert (config.objective.timestep_sampling, config.objective.logit_mean, config.objective.flow_shift) == ("logit_normal", 0.5, 1.0)
    assert (config.data.clip_l_dropout, config.data.clip_g_dropout, config.data.t5_dropout) == (0.25, 0.5, 0.75)
    assert (config.base.t5_max_length, config.network.preset, config.objective.prediction_type) == (200, "all", None)
    assert "t5xxl_dtype" in kohya.ignored  # FLUX's tab (discrete_flow_shift, guidance_scale) is dropped, not read
    with pytest.raises(ValueError, match="sdlora loads SD3's text encoders with the model"):
        read_kohya_config(_write(tmp_path, json.dumps(gui | {"sd3_clip_l": "/models/clip_l.safetensors"}), "kohya.json"))
    with pytest.raises(ValueError, match="FLUX training is not supported by sdlora"):
        read_kohya_config(_write(tmp_path, json.dumps(gui | {"sd3_checkbox": False, "flux1_checkbox": True}), "kohya.json"))


def test_run_level_bucket_options_reach_a_plain_folder():
    config = TrainConfig.from_options(data_dir="d", output_dir="o", resolution=512, buckets=True, min_bucket_reso=320,
                                      max_bucket_reso=640, bucket_reso_steps=32)  # fmt: skip
    records = [ImageRecord(Path("a.png"), "a", 2000, 500), ImageRecord(Path("b.png"), "b", 100, 100)]
    (wide, small) = record_buckets(TrainingData([DatasetSpec()], records, []), config.data)
    assert wide[0] == 640 and wide[1] % 32 == 0 and min(wide + small) >= 320  # kohya's min/max sides and step
    no_upscale = config.replace(bucket_no_upscale=True)
    assert record_buckets(TrainingData([DatasetSpec()], records, []), no_upscale.data)[1] == (96, 96)


def test_command_line_is_equivalent(tmp_path):
    options = read_kohya_config(
        _write(tmp_path, 'train_data_dir = "my set"\noutput_dir = "out"\nnetwork_dim = 8\nsave_precision = "fp16"')
    ).options
    line = command_line(options)
    assert line.startswith("sdlora train 'my set' ")
    assert "--rank 8 " in line and "--alpha 1 " in line and "--output out" in line and "--no-buckets" in line
    from sdlora.cli import build_parser
    from sdlora.config import config_from_args

    args = build_parser().parse_args(__import__("shlex").split(line)[1:])
    assert config_from_args(args) == TrainConfig.from_options(**options)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("network_dimm = 8", "unknown key 'network_dimm'"),
        ('network_dim = "8"', "network_dim = '8' must be int"),
        ("shuffle_caption = 1", "shuffle_caption = 1 must be bool"),
        ('network_module = "networks.dylora"', "network_module = 'networks.dylora' is not supported by sdlora's training yet"),
        ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "use_scalar=True"]', "use_scalar=True is not supported"),
        ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "train_norm=True"]', "train_norm=True is not supported"),
        ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=loha", "factor=8"]', "factor and decompose_both split LoKr's halves"),
        ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=locon", "conv_dim=4", "use_tucker=True"]', "peft's LoRA has no Tucker"),
        ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "factor=x"]', "factor and conv_dim are integers"),
        ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=loha", "rank_dropout=0.1"]', "rank_dropout with algo=loha"),
        ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=locon", "rank_dropout=0.1"]', "rank_dropout=0.1 is not supported"),
        ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "use_tucker=True"]', "use_tucker shapes the 3x3 convs"),
        ('network_args = ["factor=4"]', "factor=4 is not supported by sdlora's training yet with networks.lora"),
        ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=glora"]', "algo=glora (LyCORIS glora) is not supported"),
        ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=loha", "dora_wd=True"]', "dora_wd=True with algo=loha"),
        (
            'network_module = "lycoris.kohya"\nnetwork_args = ["loraplus_lr_ratio=16"]',
            "loraplus_lr_ratio=16 is not supported by sdlora's training yet with lycoris.kohya",
        ),
        ('network_args = ["down_lr_weight=wave"]', "use numbers or one of cosine, sine"),
        ('network_args = ["loraplus_lr_ratio=x"]', "network_args loraplus_lr_ratio=x: give numbers"),
        ('resolution = "512,768"', "put resolution = [512, 768] in a dataset_config"),
        ('optimizer_type = "DAdaptAdam"', "optimizer_type = 'DAdaptAdam' is not one sdlora trains with"),
        ('optimizer_type = "AdaFactor"', 'add "relative_step=False"'),
        ("save_every_n_epochs = 1", "save_every_n_epochs = 1 is not carried out by sdlora: sdlora counts in steps"),
        ("clip_skip = 2", "clip_skip = 2 is not carried out"),
        ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=locon", "dropout=0.1"]', "network_args dropout=0.1 is not supported"),
        ('mixed_precision = "fp8"', "mixed_precision = 'fp8' is not carried out by sdlora: it takes auto, no, fp16, bf16"),
        ('loss_type = "l1"', "loss_type = 'l1' is not carried out"),
        ('network_args = "conv_dim=4"', "network_args = 'conv_dim=4' must be a list"),
        ("optimizer_args = [1, 2]", "optimizer_args = [1, 2] must be a list"),
        ('text_encoder_lr = ["1e-4"]', "text_encoder_lr = ['1e-4'] must be"),
    ],
)
def test_refused_through_the_cli_with_one_line(tmp_path, capsys, text, says):
    path = _write(tmp_path, 'train_data_dir = "img"\noutput_dir = "out"\n' + text)
    assert main(["train", "--kohya-config", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and says in error[0] and str(path) in error[0], error


def test_the_guide_lists_every_key_the_table_handles():
    page = (Path(__file__).parents[2] / "docs" / "guides" / "kohya-config.md").read_text(encoding="utf-8")
    listed = {line.split("`")[1] for line in page.splitlines() if line.startswith("| `")}
    assert listed == set(KEYS) - {"sample_prompt_lines"}  # that one is kohya_ss's prompt text, not an sd-scripts key


@pytest.mark.slow  # a training run, about 25 s on two cores
def test_flags_win_and_a_tiny_run_writes_where_kohya_would(dataset, tmp_path, capsys):
    out = tmp_path / "kohya_out"
    path = _write(
        tmp_path,
        f"""
pretrained_model_name_or_path = "tiny"
train_data_dir = "{dataset}"
output_dir = "{out}"
output_name = "my_style"
caption_extension = ".txt"
resolution = "64,64"
network_dim = 4
network_alpha = 2
max_train_steps = 400
learning_rate = 1e-3
save_precision = "fp16"
xformers = true
max_data_loader_n_workers = 0
""",
    )
    assert main(["train", "--kohya-config", str(path), "--steps", "2", "--sample-steps", "1", "--no-samples"]) == 0
    err = capsys.readouterr().err
    assert "ignored (no effect on the trained LoRA): xformers, max_data_loader_n_workers" in err
    assert f"sdlora train {dataset} " in err and "--name my_style" in err
    kohya_file = out / "my_style.safetensors"
    with safe_open(str(kohya_file), "pt") as file:
        names = list(file.keys())
        assert file.metadata()["ss_output_name"] == "my_style"
        alphas = {file.get_tensor(name).item() for name in names if name.endswith(".alpha")}
        dtypes = {file.get_tensor(name).dtype for name in names if name.endswith("weight")}
        assert file.metadata()["ss_network_dim"] == "4"
    assert alphas == {2.0} and dtypes == {torch.float16}  # save_precision fp16, alpha != rank
    assert any(name.startswith("lora_te_") for name in names)  # kohya trains the text encoder by default
    assert any("_ff_net_2" in name for name in names)  # networks.lora adapts the transformer blocks' feed-forward too
    written = (out / "config.toml").read_text()
    assert "steps = 2\n" in written and "lr = 0.001\n" in written and "rank = 4\n" in written  # the flag won, the rest is kohya's


@pytest.mark.slow  # a training run of the tiny SDXL model, about 30 s on two cores
def test_an_sdxl_lycoris_locon_config_trains_both_text_encoders_at_their_rates(dataset, tmp_path, capsys):
    out = tmp_path / "sdxl_out"
    path = _write(
        tmp_path,
        f"""
pretrained_model_name_or_path = "tiny-sdxl"
train_data_dir = "{dataset}"
output_dir = "{out}"
output_name = "sdxl_style"
caption_extension = ".txt"
resolution = 64
network_module = "lycoris.kohya"
network_args = ["algo=locon", "conv_dim=2", "conv_alpha=1"]
network_dim = 4
network_alpha = 2
learning_rate = 1e-3
text_encoder_lr = [1e-4, 5e-5]
max_train_steps = 2
save_precision = "bf16"
sdpa = true
""",
    )
    assert main(["train", "--kohya-config", str(path), "--no-samples"]) == 0
    assert "--text-encoder-lr 0.0001" in capsys.readouterr().err
    with safe_open(str(out / "sdxl_style.safetensors"), "pt") as file:
        names = list(file.keys())
        conv = next(name for name in names if "_in_layers_2.lora_down" in name)  # a ResNet's 3x3 conv (LDM names)
        assert file.get_tensor(conv).shape[0] == 2 and file.get_tensor(conv).dtype == torch.bfloat16
    assert any(name.startswith("lora_te1_") for name in names) and any(name.startswith("lora_te2_") for name in names)
    written = (out / "config.toml").read_text()
    assert "text_encoder_lr = 0.0001\n" in written and "text_encoder_2_lr = 5e-05\n" in written
