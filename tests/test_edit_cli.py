"""``cm-lightning predict --edit.kind ...``: results and overviews written, the known part kept through the
command line, per-item seeding, and every bad request refused before any work."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import decode_png, read_file

from cli import main
from cm_lightning import ConsistencyTrainingModule, DiffusionModule
from cm_lightning.sampling.editing import LUMINANCE, EditTask
from datamodules.edit import Edit, builtin_mask, item_generator, strokes
from tests.helpers import module_checkpoint, tiny_args, write_images


def png(path: Path) -> torch.Tensor:
    return decode_png(read_file(str(path)))


def reference_pixels(folder: Path, mode: str = "L", size: int = 32) -> list[torch.Tensor]:
    """The references as the edit DataModule gives them: shorter side resized to 32, centre-cropped, uint8."""
    from torchvision.transforms import v2

    steps = v2.Compose([v2.Resize(size), v2.CenterCrop(size), v2.PILToTensor()])
    return [steps(Image.open(p).convert(mode)) for p in sorted(folder.glob("*.png"))]


@pytest.fixture
def mnist_ckpt(tmp_path) -> Path:
    return module_checkpoint(tmp_path / "ct.ckpt", ConsistencyTrainingModule, image_size=32)


def edit(data_args: list[str], tmp_path: Path, ckpt: Path, out: Path, *extra: str) -> None:
    main(["predict", *data_args, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
          f"--ckpt_path={ckpt}", f"--writer.output_dir={out}", *extra])


def test_inpainting_from_the_command_line_keeps_the_known_pixels_and_is_seeded_per_image(fake_mnist, tmp_path, mnist_ckpt):
    refs = tmp_path / "refs"
    write_images(refs, 5, (40, 30), "L")  # any size: brought to the model's 32×32
    args = [*tiny_args(fake_mnist), "--edit.kind=inpaint", f"--edit.images={refs}", "--edit.sigmas=[80.0, 5.0, 0.5]"]
    edit(args, tmp_path, mnist_ckpt, tmp_path / "a", "--data.batch_size=2", "--edit.mask=box")
    edit(args, tmp_path, mnist_ckpt, tmp_path / "b", "--data.batch_size=5", "--edit.mask=box")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [f"{i:06d}.png" for i in range(5)] + [f"overview_{i:06d}.png" for i in (0, 2, 4)]
    keep = builtin_mask("box", 32)
    for i, ref in enumerate(reference_pixels(refs)):
        out = png(tmp_path / "a" / f"{i:06d}.png")
        assert out.shape == (1, 32, 32)
        assert torch.equal(out[0][keep], ref[0][keep])  # the known pixels, bit for bit through uint8
        assert not torch.equal(out[0][~keep], ref[0][~keep])  # the box is the model's
        assert (tmp_path / "a" / f"{i:06d}.png").read_bytes() == (tmp_path / "b" / f"{i:06d}.png").read_bytes()
    overview = png(tmp_path / "b" / "overview_000000.png")  # references, inputs, results: 3 rows of 5
    assert overview.shape == (3, 3 * 34 + 2, 5 * 34 + 2)


def test_built_in_masks_cover_the_named_region_and_strokes_are_seeded_per_image():
    box = ~builtin_mask("box", 32)
    assert box.sum() == 16 * 16 and box[8:24, 8:24].all()
    assert (~builtin_mask("left", 32))[:, :16].all() and builtin_mask("left", 32)[:, 16:].all()
    assert (~builtin_mask("bottom", 32))[16:].all() and builtin_mask("bottom", 32)[:16].all()
    a, b = strokes(32, item_generator(0, 3)), strokes(32, item_generator(0, 3))
    assert torch.equal(a, b) and not torch.equal(a, strokes(32, item_generator(0, 4)))
    fractions = [strokes(32, item_generator(s, 0)).float().mean().item() for s in range(20)]
    assert 0.05 < min(fractions) and max(fractions) < 0.6  # strokes, neither a dot nor the whole image
    with pytest.raises(ValueError, match="built-in masks are .* got 'circle'"):
        builtin_mask("circle", 32)


def test_a_mask_folder_gives_each_image_its_mask_and_refuses_other_sizes(fake_mnist, tmp_path, mnist_ckpt):
    refs, masks = tmp_path / "refs", tmp_path / "masks"
    write_images(refs, 2, (32, 32), "L")
    masks.mkdir()
    fill = torch.zeros(32, 32, dtype=torch.uint8)
    fill[:, 20:] = 255  # white: fill the right part
    for name in ("000", "001"):
        Image.fromarray(fill.numpy(), "L").save(masks / f"{name}.png")
    args = [*tiny_args(fake_mnist), "--edit.kind=inpaint", f"--edit.images={refs}", f"--edit.mask={masks}"]
    edit(args, tmp_path, mnist_ckpt, tmp_path / "out")
    for i, ref in enumerate(reference_pixels(refs)):
        out = png(tmp_path / "out" / f"{i:06d}.png")[0]
        assert torch.equal(out[:, :20], ref[0][:, :20]) and not torch.equal(out[:, 20:], ref[0][:, 20:])
    Image.fromarray(fill[:28, :28].numpy(), "L").save(masks / "001.png")
    with pytest.raises(ValueError, match=r"mask .*001.png is 28×28 pixels; this model's images are 32×32"):
        edit(args, tmp_path, mnist_ckpt, tmp_path / "other")
    (masks / "001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no mask for .*001.png"):
        edit(args, tmp_path, mnist_ckpt, tmp_path / "other")
    assert not (tmp_path / "other").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "extra, error, match",
    [
        (["--edit.kind=colorize"], ValueError, r"colorize needs a 3-channel \(RGB\) model; this checkpoint's model has 1 channel"),
        (["--edit.kind=super_resolve", "--edit.factor=5"], ValueError, r"--edit.factor=5 does not divide this model's image size 32"),
        (["--edit.kind=inpaint", "--edit.mask=circle"], ValueError, r"--edit.mask must be one of .* 'circle' is none"),
        (["--edit.kind=inpaint", "--edit.sigmas=[5.0, 80.0]"], ValueError, r"--edit.sigmas must decrease .* got \[5.0, 80.0\]"),
        (["--edit.kind=denoise", "--edit.noise_level=200"], ValueError, r"--edit.noise_level must lie in .* got 200"),
        (["--edit.kind=inpaint", "--edit.images=EMPTY"], FileNotFoundError, r"no images .* under .*empty"),
        (["--edit.kind=inpaint", "--edit.images=MISSING"], FileNotFoundError, r"image folder .*missing.* does not exist"),
    ],
)
def test_bad_edit_requests_are_refused_before_any_work(fake_mnist, tmp_path, mnist_ckpt, extra, error, match):
    refs = tmp_path / "refs"
    write_images(refs, 2, (32, 32), "L")
    (tmp_path / "empty").mkdir()
    extra = [e.replace("EMPTY", str(tmp_path / "empty")).replace("MISSING", str(tmp_path / "missing")) for e in extra]
    images = [] if any(e.startswith("--edit.images") for e in extra) else [f"--edit.images={refs}"]
    with pytest.raises(error, match=match):
        edit([*tiny_args(fake_mnist), *images, *extra], tmp_path, mnist_ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_editing_needs_a_consistency_model_and_the_predict_command(fake_mnist, tmp_path):
    teacher = module_checkpoint(tmp_path / "edm.ckpt", DiffusionModule, image_size=32)
    args = [*tiny_args(fake_mnist, "DiffusionModule"), "--edit.kind=interpolate"]
    with pytest.raises(TypeError, match="--edit needs a consistency model .* holds a DiffusionModule"):
        edit(args, tmp_path, teacher, tmp_path / "out")
    with pytest.raises(ValueError, match="--edit.kind works with `cm-lightning predict` only, not with `test`"):
        main(["test", *tiny_args(fake_mnist), "--trainer.logger=false", "--edit.kind=inpaint"])
    with pytest.raises(ValueError, match=r"--edit.steps=1 is out of range"):
        Edit("interpolate", steps=1)


def test_interpolation_rows_end_in_the_one_step_samples_of_their_noise_pair(fake_mnist, tmp_path, mnist_ckpt):
    args = [*tiny_args(fake_mnist), "--edit.kind=interpolate", "--edit.pairs=3", "--edit.steps=5", "--edit.seed=7"]
    edit(args, tmp_path, mnist_ckpt, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{i:06d}.png" for i in range(3)] + ["overview_000000.png"]
    row = png(tmp_path / "out" / "000001.png")
    assert row.shape == (3, 32, 5 * 32)  # one pair: five slerp weights side by side
    module = ConsistencyTrainingModule.load_from_checkpoint(mnist_ckpt)
    from cm_lightning.core.noise import indexed_noise

    z = indexed_noise(7, [1], 2, (1, 32, 32))[:, 0]  # item 1's (z0, z1)
    ends = module.sample_from_noise(z.unsqueeze(0), [80.0])  # one step from each: a batch of two
    expected = ((ends + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(row[0, :, :32], expected[0, 0]) and torch.equal(row[0, :, -32:], expected[1, 0])
    assert not torch.equal(row[0, :, 64:96], expected[0, 0])  # α = ½ is neither end


def test_colourisation_and_super_resolution_from_the_command_line_keep_luminance_and_patch_means(fake_cifar10, tmp_path):
    ckpt = module_checkpoint(tmp_path / "rgb.ckpt", ConsistencyTrainingModule, image_size=32, channels=3)
    refs = tmp_path / "refs"
    write_images(refs, 3, (32, 32), "RGB")
    data = ["--data", "CIFAR10DataModule", f"--data.data_dir={fake_cifar10}", *tiny_args(fake_cifar10)[4:]]
    refs_uint8 = torch.stack(reference_pixels(refs, "RGB")).float()
    edit([*data, "--edit.kind=colorize", f"--edit.images={refs}"], tmp_path, ckpt, tmp_path / "colour")
    w = torch.tensor(LUMINANCE).reshape(1, 3, 1, 1)
    out = torch.stack([png(tmp_path / "colour" / f"{i:06d}.png") for i in range(3)]).float()
    inside = ((out > 0) & (out < 255)).all(1)  # pixels the PNG's [0, 255] range did not clip
    assert inside.float().mean() > 0.5
    assert ((out * w).sum(1) - (refs_uint8 * w).sum(1))[inside].abs().max() <= 1.0  # luminance kept, to uint8 rounding
    assert (out - refs_uint8).abs().max() > 20  # the colours are the model's
    overview = png(tmp_path / "colour" / "overview_000000.png").float()  # the input row: grey, R = G = B = luminance
    inputs = overview[:, 36:68, 2:34]
    assert torch.equal(inputs[0], inputs[1]) and torch.equal(inputs[1], inputs[2])
    assert (inputs[0] - (refs_uint8[0] * w[0]).sum(0)).abs().max() <= 1.0
    edit([*data, "--edit.kind=super_resolve", "--edit.factor=4", f"--edit.images={refs}"], tmp_path, ckpt, tmp_path / "sr")
    out = torch.stack([png(tmp_path / "sr" / f"{i:06d}.png") for i in range(3)]).float()
    inside = F.max_pool2d(((out == 0) | (out == 255)).float(), 4) == 0  # patches with no clipped pixel
    assert inside.float().mean() > 0.5
    assert (F.avg_pool2d(out, 4) - F.avg_pool2d(refs_uint8, 4))[inside].abs().max() <= 1.0  # each 4×4 patch mean kept


def test_denoising_task_adds_seeded_noise_and_maps_it_back_in_one_step():
    torch.manual_seed(0)
    net = lambda x, sigma: x * 0.5  # noqa: E731  (any f(x, σ); here a shrinking one)
    reference = torch.rand(2, 1, 8, 8) * 2 - 1
    noise = torch.randn(2, 1, 1, 8, 8)
    batch = {"index": torch.arange(2), "reference": reference, "noise": noise}
    out = EditTask("denoise", noise_level=0.3)(net, batch)
    torch.testing.assert_close(out["degraded"], (reference + 0.3 * noise[:, 0]).clamp(-1, 1))
    torch.testing.assert_close(out["result"], ((reference + 0.3 * noise[:, 0]) * 0.5).clamp(-1, 1))
    given = EditTask("denoise", noise_level=0.3, add_noise=False)(net, batch)  # inputs noisy already
    torch.testing.assert_close(given["result"], (reference * 0.5).clamp(-1, 1))


@pytest.mark.slow
def test_edits_over_two_ranks_equal_one_process(fake_mnist, tmp_path, mnist_ckpt):
    refs = tmp_path / "refs"
    write_images(refs, 5, (32, 32), "L")
    args = [*tiny_args(fake_mnist), "--edit.kind=inpaint", f"--edit.images={refs}", "--edit.mask=strokes", "--data.batch_size=2"]
    edit(args, tmp_path, mnist_ckpt, tmp_path / "one")
    edit([*args, "--trainer.strategy=ddp_spawn", "--trainer.devices=2"], tmp_path, mnist_ckpt, tmp_path / "two")
    for i in range(5):  # each rank edits its share; every image is the one a single process makes
        assert (tmp_path / "one" / f"{i:06d}.png").read_bytes() == (tmp_path / "two" / f"{i:06d}.png").read_bytes()
    assert len(list((tmp_path / "two").glob("overview_*.png"))) == 3  # 5 images, 2 per batch, over the ranks
