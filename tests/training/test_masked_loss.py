"""Masked loss (kohya's masked_loss): masks from a mask folder or the images' alpha, carried through crops, resizes
and flips as the image is, cached with the latents, and weighting the per-pixel loss so that the masked part of an
image gives no gradient at all."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.cli import main
from sdlora.errors import UserError
from sdlora.training import recipe
from sdlora.training.cache import Draw
from sdlora.training.config import ObjectiveConfig, TrainConfig
from sdlora.training.data import ImageRecord, crop_window, find_images, load_image, load_mask, with_masks
from sdlora.training.datasets import load_training_data
from sdlora.training.kohya_config import kohya_options
from sdlora.training.objective import diffusion_loss, latent_mask


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    """An asymmetric uint8 picture: a diagonal gradient, a bright block near the top left, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    picture = (x * 200 // width + y * 50 // height).astype(np.int32)
    picture[: height // 3, : width // 4] = 255
    return np.clip(picture + rng.integers(0, 30, (height, width)), 0, 255).astype(np.uint8)


def _masked_dataset(folder: Path, count: int = 4, alpha: bool = False) -> tuple[Path, Path]:
    """`count` captioned images (landscape and portrait) and, in folder/masks, a mask per image that is black on
    the left half and an asymmetric pattern on the right; with `alpha` the mask is the images' alpha instead."""
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for index in range(count):
        width, height = (96, 64) if index % 2 == 0 else (64, 96)
        rgb = np.stack([_pattern(width, height, index + seed) for seed in (10, 20, 30)], axis=-1)
        mask = _pattern(width, height, index)
        mask[:, : width // 2] = 0
        if alpha:
            Image.fromarray(np.concatenate([rgb, mask[..., None]], axis=-1), "RGBA").save(images / f"img{index}.png")
        else:
            Image.fromarray(rgb, "RGB").save(images / f"img{index}.png")
            Image.fromarray(mask, "L").save(masks / f"img{index}.png")
        (images / f"img{index}.txt").write_text(f"picture {index}")
    return images, masks


# ---------------------------------------------------------------- masks follow their image


@pytest.mark.parametrize("alpha", [False, True])
def test_a_mask_is_cut_resized_and_mirrored_exactly_as_its_image(tmp_path, alpha):
    """The image's own red channel given as its mask (or as its alpha) comes back equal, value for value, to the red
    channel of the loaded image at every crop window, bucket size and flip: same window, resampling and mirror."""
    folder = tmp_path / "data"
    folder.mkdir()
    rgb = np.stack([_pattern(90, 70, seed) for seed in (1, 2, 3)], axis=-1)
    if alpha:
        Image.fromarray(np.concatenate([rgb, rgb[..., :1]], axis=-1), "RGBA").save(folder / "a.png")
    else:
        Image.fromarray(rgb, "RGB").save(folder / "a.png")
        (tmp_path / "masks").mkdir()
        Image.fromarray(rgb[..., 0], "L").save(tmp_path / "masks" / "a.png")
    records = with_masks(find_images(folder, caption="x"), folder, None if alpha else str(tmp_path / "masks"), alpha, "test")
    record = records[0]
    assert record.mask_source == (record.path if alpha else tmp_path / "masks" / "a.png")
    rng = random.Random(0)
    for size in ((64, 48), (48, 64), (32, 32)):
        for crop in ("center", "random", "random"):
            window = crop_window(record, size, crop, rng)
            for flip in (False, True):
                mask = load_mask(record, size, window, flip)
                red = load_image(dataclass_without_alpha(record, rgb, tmp_path) if alpha else record, size, flip=flip, window=window)[0]
                assert mask.shape == (1, size[1], size[0])
                assert torch.equal((mask[0] * 255).round(), ((red + 1) * 127.5).round())
                if flip:  # and the mirror is of the unflipped mask
                    assert torch.equal(mask, load_mask(record, size, window, False).flip(-1))


def dataclass_without_alpha(record: ImageRecord, rgb: np.ndarray, tmp_path: Path) -> ImageRecord:
    """The same picture without its alpha (the loader lays transparency on white, so compare with the opaque one)."""
    opaque = tmp_path / "opaque.png"
    Image.fromarray(rgb, "RGB").save(opaque)
    return ImageRecord(opaque, record.caption, record.width, record.height)


def test_area_to_the_latent_grid_is_the_mean_over_each_latent_pixel():
    mask = torch.rand(2, 1, 16, 24)
    on_grid = latent_mask(mask, (2, 3))
    expected = mask.reshape(2, 1, 2, 8, 3, 8).mean(dim=(3, 5))
    torch.testing.assert_close(on_grid, expected)


# ---------------------------------------------------------------- the loss


class _PixelwiseUNet(torch.nn.Module):
    """A UNet stand-in whose prediction at a pixel depends on that pixel alone (a 1x1 conv), so that the masked
    half's inputs reach the loss only through the masked half's prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        return (self.conv(sample) * (1 + encoder_hidden_states.mean()),)


def _weight_gradient(unet, scheduler, latents, noise, mask) -> torch.Tensor:
    unet.zero_grad()
    timesteps = torch.tensor([100, 700])
    loss = diffusion_loss(unet, scheduler, latents, torch.ones(2, 3, 8), ObjectiveConfig(), timesteps=timesteps, noise=noise, mask=mask)
    loss.backward()
    return unet.conv.weight.grad.clone()


def test_the_masked_half_gives_no_gradient_at_all():
    """Changing the latents and the noise under the mask leaves the gradient bit for bit unchanged; changing them in
    the unmasked half changes it. kohya's rule: loss * mask, then the plain mean (no renormalisation by the area)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    unet = _PixelwiseUNet()
    generator = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(2, 4, 6, 10, generator=generator), torch.randn(2, 4, 6, 10, generator=generator)
    mask = torch.ones(2, 1, 6, 10)
    mask[..., :5] = 0.0
    mask[1, :, :, 7] = 0.25  # a partly masked column weighs its loss by its value
    reference = _weight_gradient(unet, scheduler, latents, noise, mask)
    changed_latents, changed_noise = latents.clone(), noise.clone()
    changed_latents[..., :5] = torch.randn(2, 4, 6, 5, generator=generator) * 10
    changed_noise[..., :5] = torch.randn(2, 4, 6, 5, generator=generator)
    assert torch.equal(_weight_gradient(unet, scheduler, changed_latents, changed_noise, mask), reference)
    changed_latents[..., 8] += 1.0
    assert not torch.allclose(_weight_gradient(unet, scheduler, changed_latents, noise, mask), reference)
    # the value: the unmasked mean over the whole image's pixel count
    plain = diffusion_loss(
        unet, scheduler, latents, torch.ones(2, 3, 8), ObjectiveConfig(), timesteps=torch.tensor([100, 700]), noise=noise
    )
    weighted = diffusion_loss(
        unet, scheduler, latents, torch.ones(2, 3, 8), ObjectiveConfig(), timesteps=torch.tensor([100, 700]), noise=noise, mask=mask
    )
    assert 0 < weighted < plain


# ---------------------------------------------------------------- through training: cache, flips, the real UNet


def _masks_and_prediction_gradient(run, draws: list[Draw]) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch's loss masks, and the gradient of the masked loss at the real UNet's prediction."""
    latents, conditioning, masks = run.encoder.encode(draws, torch.Generator().manual_seed(0))
    captured = {}

    def keep(module, inputs, output):
        output[0].retain_grad()
        captured["prediction"] = output[0]

    handle = run.model.unet.register_forward_hook(keep)
    try:
        loss = diffusion_loss(
            run.model.unet, run.model.noise_scheduler, latents, conditioning, run.config.objective,
            generator=torch.Generator().manual_seed(1), mask=masks,
        )  # fmt: skip
        loss.backward()
    finally:
        handle.remove()
    return masks, captured["prediction"].grad


@pytest.mark.slow  # three setups of the tiny model: 3 s alone, up to 18 s on two shared cores
def test_training_masks_follow_flips_are_cached_and_zero_the_masked_gradient(tmp_path, tiny_config):
    """On the tiny SD1 model: the masks a micro-batch trains with are the same from the memory cache, the disk cache
    and no cache; a mirrored draw has the mirrored mask; the gradient at the UNet's prediction is exactly zero where
    the mask is (the left half) and not elsewhere."""
    images, masks_dir = _masked_dataset(tmp_path, count=2)
    options = dict(mask_dir=str(masks_dir), masked_loss=True, flip=True, buckets=True, batch_size=1)
    found = {}
    for cache in ("memory", "disk", "off"):
        run = recipe.setup(tiny_config(images, tmp_path / f"out-{cache}", cache=cache, **options))
        index = next(i for i, record in enumerate(run.records) if record.path.name == "img0.png")
        record, size = run.records[index], run.buckets[index]
        window = crop_window(record, size)
        plain = Draw(index, size, False, window, record.caption)
        mirrored = Draw(index, size, True, window, record.caption)
        found[cache] = [run.encoder.encode([d], torch.Generator().manual_seed(0))[2] for d in (plain, mirrored)]
        if cache == "memory":
            masks, gradient = _masks_and_prediction_gradient(run, [plain])
        if run.encoder.loader is not None:
            run.encoder.loader.close()
    plain_mask, mirrored_mask = found["memory"]
    width, zero = plain_mask.shape[-1], plain_mask == 0
    # the left half is black: zero but for the columns Lanczos and the area average blend with the right half
    assert plain_mask.shape[:2] == (1, 1) and zero[..., : width * 2 // 5].all() and not zero[..., width * 3 // 5 :].any()
    # the pixel masks mirror exactly (test above); the area mean sums a mirrored window in another order
    torch.testing.assert_close(mirrored_mask, plain_mask.flip(-1), rtol=0, atol=1e-6)
    for cache in ("disk", "off"):
        assert all(torch.equal(a, b) for a, b in zip(found[cache], found["memory"])), cache
    assert torch.equal(masks, plain_mask)
    assert torch.all(gradient[zero.expand_as(gradient)] == 0)
    assert gradient[~zero.expand_as(gradient)].abs().min() > 0


def test_cache_keys_change_with_the_mask(tmp_path, tiny_config):
    images, masks_dir = _masked_dataset(tmp_path, count=2)
    first = recipe.setup(tiny_config(images, tmp_path / "one", mask_dir=str(masks_dir), masked_loss=True, cache="disk", batch_size=1))
    Image.new("L", Image.open(masks_dir / "img0.png").size, 255).save(masks_dir / "img0.png")
    second = recipe.setup(
        tiny_config(
            images, tmp_path / "two", mask_dir=str(masks_dir), masked_loss=True, cache="disk", batch_size=1, steps=2, checkpoint_every=0
        )
    )
    changed = first.encoder.latent_cache.keys ^ second.encoder.latent_cache.keys
    assert len(changed) == 2 and all("-mask" in key for key in changed)  # img0's old and new entries; img1's is shared
    recipe.run_steps(second)  # and the masked steps train
    assert all(torch.isfinite(p).all() for p in second.trainable.values())


# ---------------------------------------------------------------- hostile inputs, one line each


def test_mask_folder_problems_are_one_line_naming_the_files(tmp_path):
    images, masks = _masked_dataset(tmp_path, count=3)
    records = find_images(images)
    Image.new("L", (50, 40)).save(masks / "img1.png")
    with pytest.raises(UserError, match=r"masks must have their image's size \(img1.png is 50x40, img1.png 64x96\)"):
        with_masks(records, images, str(masks), False, "here")
    (masks / "img1.png").unlink()
    with pytest.raises(UserError, match=r"here: no mask in .* for 1 images \(img1.png\)"):
        with_masks(records, images, str(masks), False, "here")
    Image.new("L", (64, 96)).save(masks / "img1.jpg")
    Image.new("L", (64, 96)).save(masks / "stray.png")
    with pytest.raises(UserError, match=r"1 masks in .* have no image \(stray.png\)"):
        with_masks(records, images, str(masks), False, "here")
    Image.new("L", (64, 96)).save(masks / "img1.png")
    with pytest.raises(UserError, match=r"two masks for one image .*img1.jpg and img1.png"):
        with_masks(records, images, str(masks), False, "here")
    with pytest.raises(UserError, match=r"alpha_mask, but 3 images have no alpha channel \(img0.png, img1.png, img2.png\)"):
        with_masks(records, images, None, True, "here")


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"masked_loss": True}, "--masked-loss needs masks: pass --mask-dir DIR"),
        ({"alpha_mask": True}, "--alpha-mask gives loss masks, which only --masked-loss uses"),
        ({"mask_dir": "m"}, "--mask-dir gives loss masks, which only --masked-loss uses"),
        ({"mask_dir": "m", "alpha_mask": True, "masked_loss": True}, "two mask sources: keep one"),
        (
            {"mask_dir": "m", "masked_loss": True, "data_dir": "", "dataset_config": "d.toml"},
            "give each subset of the TOML its conditioning_data_dir",
        ),
    ],
)
def test_mask_options_that_cannot_work_are_refused(options, says):
    with pytest.raises(UserError, match=says):
        TrainConfig.from_options(**{"data_dir": "data", "output_dir": "out", **options})


def test_a_missing_mask_stops_the_run_before_the_model_loads(tmp_path, capsys):
    images, masks = _masked_dataset(tmp_path, count=2)
    (masks / "img1.png").unlink()
    code = main(["train", str(images), "--output", str(tmp_path / "out"), "--mask-dir", str(masks), "--masked-loss"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "no mask in" in error[0] and "img1.png" in error[0], error
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- kohya's keys


def test_dataset_toml_conditioning_data_dir_and_alpha_mask_are_carried_out(tmp_path):
    images, masks = _masked_dataset(tmp_path / "a")
    alpha_images, _ = _masked_dataset(tmp_path / "b", alpha=True)
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.new("RGB", (64, 64)).save(plain / "p.png")
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images}"\nconditioning_data_dir = "{masks}"\n'
        f'[[datasets.subsets]]\nimage_dir = "{alpha_images}"\nalpha_mask = true\n'
        f'[[datasets.subsets]]\nimage_dir = "{plain}"\nclass_tokens = "thing"\nis_reg = true\n'
    )
    config = TrainConfig.from_options(dataset_config=str(toml), masked_loss=True, output_dir=str(tmp_path / "out"))
    data = load_training_data(config.data, 0, config.run.output_dir)
    by_folder = {}
    for record in data.records:
        by_folder.setdefault(record.path.parent, set()).add((record.mask_source, record.alpha_mask))
    assert by_folder[images] == {(masks / f"img{i}.png", False) for i in range(4)}
    assert by_folder[alpha_images] == {(alpha_images / f"img{i}.png", True) for i in range(4)}
    assert by_folder[plain] == {(None, False)}  # trains whole (ones, as kohya fills a batch's mask-less images)
    recipe._check_masks(config, data)
    unmasked = config.replace(masked_loss=False)
    with pytest.raises(UserError, match="gives loss masks .* only --masked-loss uses"):
        recipe._check_masks(unmasked, data)
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images}"\nconditioning_data_dir = "{masks}"\nalpha_mask = true\n')
    with pytest.raises(UserError, match="two mask sources for one subset"):
        load_training_data(config.data, 0, config.run.output_dir)


def test_kohya_training_config_mask_keys_are_carried_out():
    options, _ = kohya_options({"train_data_dir": "img", "masked_loss": True, "conditioning_data_dir": "masks"})
    assert (options["masked_loss"], options["mask_dir"]) == (True, "masks")
    options, _ = kohya_options({"train_data_dir": "img", "alpha_mask": True})
    assert (options["alpha_mask"], options["masked_loss"]) == (True, True)  # kohya weighs by alpha masks always
    options, _ = kohya_options({"train_data_dir": "img", "alpha_mask": False})
    assert "alpha_mask" not in options and "masked_loss" not in options
