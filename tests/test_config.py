"""Tests for guided_diffusion.config: --preset, --predict_xstart, the seed's formulation, old checkpoints."""
import pytest
import torch

from guided_diffusion.config import PRESETS, DiffusionConfig, ModelConfig, parse_train_args, unused_model_flags
from guided_diffusion.sampling import pipeline

SEED_FLAGS = ("--data_name ISIC --data_dir ISIC --out_dir runs/isic --image_size 256 --num_channels 128 "
              "--class_cond False --num_res_blocks 2 --num_heads 1 --learn_sigma True --use_scale_shift_norm False "
              "--attention_resolutions 16 --diffusion_steps 1000 --noise_schedule linear "
              "--rescale_learned_sigmas False --rescale_timesteps False --lr 1e-4 --batch_size 16").split()


def test_the_seeds_flags_give_the_seeds_eps_formulation():
    model, diffusion, _, train = parse_train_args(SEED_FLAGS)
    assert (diffusion.prediction, diffusion.learn_sigma, diffusion.mask_scale, diffusion.self_condition) == \
        ("eps", True, 1.0, False)
    assert (model.image_concat, train.mask_loss_weight, train.t_power, train.preset) == (False, 0.0, 1.0, "none")


def test_preset_sets_what_is_not_given_and_explicit_flags_win():
    model, diffusion, _, train = parse_train_args(["--preset", "cpu", "--image_size", "64", "--lr", "3e-4"])
    recipe = PRESETS["cpu"]
    got = {**vars(model), **vars(diffusion), **vars(train)}
    for key, value in recipe.items():
        if key != "lr":
            assert got[key] == value, key
    assert train.lr == 3e-4 and model.image_size == 64 and train.preset == "cpu"
    model, _, _, _ = parse_train_args(["--num_channels", "40", "--preset", "cpu"])  # order does not matter
    assert model.num_channels == 40


def test_a_preset_head_stride_that_does_not_divide_the_image_size_names_the_preset(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_train_args(["--preset", "cpu", "--image_size", "30"])
    assert exc.value.code == 2 and ("--preset cpu sets --head_stride 4, which must divide --image_size 30: give "
                                    "--head_stride 1") in capsys.readouterr().err
    model = parse_train_args(["--preset", "cpu", "--image_size", "30", "--head_stride", "2"])[0]  # given: it wins
    assert (model.head_stride, model.image_size) == (2, 30)
    assert parse_train_args(["--preset", "cpu", "--image_size", "36"])[0].head_stride == 4


def test_unknown_preset_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_train_args(["--preset", "gpu-huge"])
    assert exc.value.code == 2 and "--preset must be none or cpu, got 'gpu-huge'" in capsys.readouterr().err


def test_flags_the_network_does_not_use_are_named():
    """The seed's attention flags with --network decoupled or unet, and --head_blocks on the other networks; the
    preset's own values and each network's own flags are not named."""
    seed_model = parse_train_args(SEED_FLAGS + ["--network", "decoupled", "--use_checkpoint", "True"])[0]
    assert unused_model_flags(seed_model) == ["--attention_resolutions 16", "--use_checkpoint True"]
    assert unused_model_flags(parse_train_args(["--preset", "cpu"])[0]) == []
    assert unused_model_flags(parse_train_args(SEED_FLAGS)[0]) == []  # medsegdiff uses them all
    assert unused_model_flags(ModelConfig(network="unet", attention_resolutions="", head_blocks=3)) == \
        ["--head_blocks 3"]
    assert unused_model_flags(ModelConfig(network="medsegdiff", head_blocks=3, head_channels=8, head_stride=2)) == \
        ["--head_blocks 3", "--head_channels 8", "--head_stride 2"]
    assert unused_model_flags(ModelConfig(network="decoupled", attention_resolutions="", head_blocks=3)) == []
    for flags, named in (([], []), (["--head_stride", "2"], ["--head_stride 2"])):  # not the preset's own value
        model = parse_train_args(["--preset", "cpu", "--network", "medsegdiff", *flags])[0]
        assert unused_model_flags(model, "cpu") == named


def test_predict_xstart_is_the_x0_target():
    assert DiffusionConfig(predict_xstart=True).prediction == "x0"
    assert DiffusionConfig(prediction="x0").predict_xstart is True
    assert DiffusionConfig(prediction="v").predict_xstart is False
    with pytest.raises(ValueError, match="--predict_xstart True contradicts --prediction v"):
        DiffusionConfig(predict_xstart=True, prediction="v")
    _, diffusion, _, _ = parse_train_args(["--predict_xstart", "True"])
    assert diffusion.prediction == "x0"


def test_a_checkpoint_from_before_the_new_fields_samples_as_an_eps_model(trained, tmp_path):
    run = trained / "run"
    ckpt = torch.load(next(run.glob("model_*.pt")), map_location="cpu", weights_only=True)
    for key in ("prediction", "predict_xstart", "mask_scale", "self_condition"):
        ckpt["config"]["diffusion"].pop(key)
    for key in ("image_concat", "head_blocks", "head_channels", "head_stride"):
        ckpt["config"]["model"].pop(key)
    for key in ("mask_loss_weight", "mse_weight", "self_condition_rate", "recycle", "t_power", "preset",
                "max_minutes"):
        ckpt["config"]["train"].pop(key)
    ckpt.pop("kind")
    ckpt.pop("train_seconds")
    torch.save(ckpt, tmp_path / "model_0000002.pt")
    lm = pipeline.load_model(str(tmp_path), torch.device("cpu"))
    assert lm.diffusion.prediction == "eps" and lm.diffusion.mask_scale == 1.0 and not lm.model.self_condition
    summary = pipeline.run_sampling(pipeline.SampleConfig(model_path=str(tmp_path), out_dir=str(tmp_path / "out"),
                                                          sampler="dpm_solver++", steps=2, num_ensemble=2,
                                                          max_images=2, num_workers=0, device="cpu"),
                                    {}, torch.device("cpu"))
    assert summary.images == 2 and len(list((tmp_path / "out").glob("*.png"))) == 2
