"""Typed configuration: every training flag's resume class (a new field without one fails here), config.json of any
age read into the configs, DiTConfig as the one description of a DiT, and the objective interface."""

import json
import os

import pytest
import torch

from helpers import REPO
from opendit.cli.flags import parse_argv
from opendit.config import CHANGE, MACHINE, RESUME_CLASSES, RUN, FolderConfig, GridConfig, TrainConfig
from opendit.models import DiT, DiTConfig, DiT_models, config_from_state_dict
from opendit.objectives import DiffusionObjective, FlowObjective, Objective, build_objective

# every training flag and what a resume does with it; a setting added to TrainConfig must be added here, with the
# class its field declares
RESUME = {
    # model
    "model": RUN, "use_rmsnorm": RUN, "use_swiglu": RUN, "use_rope": RUN, "use_qknorm": RUN, "wo_shift": RUN,
    "wo_pos_embed": RUN,
    # data
    "dataset": RUN, "data_path": CHANGE, "image_size": RUN, "num_classes": RUN, "vae": RUN, "latent_norm": RUN,
    "latent_multiplier": RUN, "num_workers": MACHINE, "on_bad_image": CHANGE,
    # objective
    "objective": RUN, "path_type": RUN, "prediction": RUN, "loss_weight": RUN, "train_eps": RUN, "sample_eps": RUN,
    "time_sampling": RUN, "time_mean": RUN, "time_std": RUN, "cosine_loss": RUN,
    "p_mean": RUN, "p_std": RUN, "data_proportion": RUN, "omega": RUN, "kappa": RUN, "t_start": RUN, "t_end": RUN,
    "norm_p": RUN, "norm_eps": RUN,
    # optimization (the per-process batch: through the global batch, which defines the run)
    "batch_size": RUN, "global_seed": RUN, "epochs": CHANGE, "max_steps": CHANGE, "lr": CHANGE,
    "lr_schedule": CHANGE, "warmup_steps": CHANGE, "adam_beta2": RUN, "optimizer_impl": MACHINE, "grad_clip": CHANGE,
    "ema_decay": CHANGE, "ema_std": CHANGE, "optimizer": RUN, "max_bad_steps": CHANGE,
    # alignment
    "repa_encoder": RUN, "repa_encoder_weights": MACHINE, "repa_depth": RUN, "repa_lambda": CHANGE,
    "repa_projector_dim": RUN,
    # schedule and logging
    "outputs": MACHINE, "load": MACHINE, "log_every": CHANGE, "ckpt_every": CHANGE, "ckpt_keep": CHANGE,
    "wandb": MACHINE, "wandb_project": MACHINE, "wandb_mode": MACHINE, "config": MACHINE,
    # evaluation
    "eval_every": CHANGE, "eval_samples": CHANGE, "eval_cfg_scale": CHANGE, "eval_features": CHANGE,
    "eval_reference": CHANGE, "inception": MACHINE, "final_samples": CHANGE, "final_cfg_scale": CHANGE,
    # machine
    "device": MACHINE, "plugin": MACHINE, "mixed_precision": CHANGE, "grad_reduce_dtype": CHANGE,
    "grad_checkpoint": MACHINE, "enable_flashattn": MACHINE, "enable_layernorm_kernel": MACHINE,
    "enable_modulate_kernel": MACHINE, "compile": MACHINE,
}


def test_every_training_flag_has_a_resume_class():
    from opendit.cli.train import build_parser

    declared = {f.name: f.metadata.get("resume") for _, f in TrainConfig.settings()}
    missing = sorted(k for k, v in declared.items() if v not in RESUME_CLASSES)
    assert not missing, f"settings without a resume class (RUN, CHANGE or MACHINE): {missing}"
    assert declared == RESUME, {k: (declared.get(k), RESUME.get(k)) for k in set(declared) | set(RESUME)
                                if declared.get(k) != RESUME.get(k)}
    flags = {a.dest for a in build_parser()._actions if a.option_strings and a.dest != "help"}
    assert flags == set(RESUME)  # every flag of the program is a setting, and the other way


def test_a_setting_without_a_resume_class_is_caught():
    from dataclasses import dataclass

    from opendit.config import Config, section, setting

    @dataclass
    class Extra:
        new_flag: int = setting(1, "a flag someone added")

    @dataclass
    class Grown(TrainConfig):
        extra: Extra = section(Extra, "extra")

    declared = {f.name: f.metadata.get("resume") for _, f in Grown.settings()}
    assert declared["new_flag"] is None and "new_flag" not in RESUME  # what the test above fails on
    assert issubclass(Grown, Config)


def test_the_resume_rules_read_the_declarations():
    from opendit.training.run_settings import CHANGEABLE, DEFINING

    assert set(DEFINING) == {k for k, v in RESUME.items() if v == RUN} - {"batch_size"}
    assert set(CHANGEABLE) == {k for k, v in RESUME.items() if v == CHANGE}


def test_flags_and_recipes_are_unchanged_by_the_typed_parse():
    from opendit.cli.recipes import config_argv
    from opendit.cli.train import build_parser

    for name in sorted(os.listdir(os.path.join(REPO, "recipes"))):
        path = os.path.join(REPO, "recipes", name)
        argv = config_argv(build_parser(), path, "train")
        ns = build_parser().parse_args(argv)
        assert parse_argv(TrainConfig, argv).flat() == vars(ns)
        for cls in (GridConfig, FolderConfig):
            from opendit.cli.sample import build_parser as grid
            from opendit.cli.sample_ddp import build_parser as ddp

            parser = grid() if cls is GridConfig else ddp()
            sample = [*config_argv(parser, path, "sample"), "--ckpt", "x.pt"]
            assert parse_argv(cls, sample).flat() == vars(parser.parse_args(sample))


def test_an_old_config_json_reads_into_the_new_config():
    """A run directory written before the typed configs (the flat flag -> value mapping plus what the run resolved)
    reads back, and the new one has the same keys plus its model's DiTConfig."""
    old = {"model": "DiT-N/2", "dataset": "digits", "lr": 0.002, "lr_schedule": "cosine", "use_rope": False,
           "objective": "diffusion", "repa_encoder": None, "config": None, "input_size": 8, "in_channels": 1,
           "vae_resolved": None, "world_size": 1, "global_batch": 128, "class_names": list("0123456789"),
           "latent_stats": None, "no_longer_a_flag": 3}
    cfg = TrainConfig.from_flat(old)
    assert (cfg.model.model, cfg.data.dataset, cfg.optim.lr, cfg.optim.lr_schedule) == ("DiT-N/2", "digits", 0.002,
                                                                                        "cosine")
    assert cfg.optim.batch_size == 2 and cfg.machine.plugin == "zero2"  # absent: the defaults
    assert set(cfg.flat()) == set(RESUME)


def test_dit_config_is_the_one_description_of_a_dit():
    cfg = DiTConfig.from_name("DiT-S/4", input_size=16, in_channels=3, num_classes=7, use_rope=True, use_swiglu=True)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.name) == (12, 384, 6, 4, "DiT-S/4")
    with torch.device("meta"):
        built = DiT(cfg)
        registry = DiT_models["DiT-S/4"](input_size=16, in_channels=3, num_classes=7, use_rope=True, use_swiglu=True)
        by_fields = DiT(**cfg.to_dict())
    assert built.config == registry.config == by_fields.config == cfg
    assert DiTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # config.json
    torch.manual_seed(0)
    small = DiT(DiTConfig.from_name("DiT-N/2", input_size=(8, 12), in_channels=2, num_classes=3, use_qknorm=True))
    sd = small.state_dict()
    assert DiTConfig.from_state_dict(sd, input_size=(8, 12)) == small.config  # what the weights show
    assert config_from_state_dict(sd)["num_tokens"] == 24
    with pytest.raises(ValueError, match="not a square grid"):
        DiTConfig.from_state_dict(sd)
    with pytest.raises(TypeError):
        DiT(cfg, depth=3)
    with pytest.raises(ValueError, match="wo_pos_embed"):
        DiTConfig(wo_pos_embed=True)


def test_the_run_records_its_dit_config(tmp_path):
    from helpers import TINY, only_run_dir, run_train

    r = run_train(*TINY, "--max_steps", "1", "--batch_size", "8", "--outputs", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.load(open(os.path.join(only_run_dir(tmp_path / "o"), "config.json")))
    dit = DiTConfig.from_dict(rec["dit"])
    assert dit == DiTConfig.from_name(rec["model"], input_size=rec["input_size"], in_channels=rec["in_channels"],
                                      num_classes=rec["num_classes"])


@pytest.mark.parametrize("settings", [{"objective": "diffusion"},
                                      {"objective": "flow", "path_type": "GVP", "time_sampling": "logit_normal"}])
def test_both_objectives_implement_the_one_interface(settings):
    obj = build_objective(settings)
    assert isinstance(obj, Objective) and isinstance(obj, (DiffusionObjective, FlowObjective))
    assert build_objective(obj.record()).record() == obj.record()  # what a checkpoint records builds it again
    assert obj.default_sampler in obj.samplers and obj.quick_sampler["sampler"] in obj.samplers
    t = obj.sample_timesteps(64, generator=torch.Generator().manual_seed(0))
    times = torch.tensor([obj.guidance_time(v.reshape(1)) for v in t])
    assert ((times >= 0) & (times <= 1)).all()
    # guidance time and noise level agree: the noisier a call, the earlier in time
    a, b = sorted(t.tolist())[:1] + sorted(t.tolist())[-1:]
    ta, tb = torch.tensor([a]), torch.tensor([b])
    if obj.name == "diffusion":  # timestep 999 is the noisiest
        assert obj.guidance_time(tb) < obj.guidance_time(ta) and obj.noise_level(tb) > obj.noise_level(ta)
    else:  # t = 0 is noise
        assert obj.guidance_time(ta) < obj.guidance_time(tb) and obj.noise_level(ta) > obj.noise_level(tb)


def test_the_diffusion_time_axis_comes_from_its_own_schedule():
    from opendit.diffusion import create_diffusion

    short = DiffusionObjective(create_diffusion("", diffusion_steps=100))
    assert short.guidance_time(torch.tensor([50.0])) == pytest.approx(0.5)
    assert DiffusionObjective().guidance_time(torch.tensor([500.0])) == pytest.approx(0.5)


def test_the_meanflow_defaults_are_one_set():
    """The released defaults stand in three places (the flags, the recorded settings, create_meanflow): all agree."""
    from opendit.config.train import ObjectiveSettings
    from opendit.objectives import MEANFLOW_SETTINGS, MeanFlowObjective
    from opendit.transport import create_meanflow

    flags = {k: getattr(ObjectiveSettings(), k) for k in ObjectiveSettings.MEANFLOW_ONLY}
    recorded = {k: v for k, v in MeanFlowObjective(create_meanflow()).record().items() if k != "objective"}
    assert flags == MEANFLOW_SETTINGS == recorded
