"""The ablation's arms and stages: what each trains, with which arguments, from which teacher (``ablation_mnist.py``
runs and scores them)."""

from quality_mnist import DEFAULT2, EDM2_LAW, EDM_LAW, HEUN10, ONE_STEP, STAGES, Stage
from quality_mnist import preset as preset_config

ARMS = {
    "fourier16": (),  # today's presets: random Fourier features of c_noise at scale 16
    "fourier0.02": ("--model.net.init_args.fourier_scale=0.02",),  # iCT §3.1's scale
    "positional_edm": ("--model.net.init_args.embedding_type=positional_edm",),  # EDM DDPM++: sinusoids of c_noise
    # σ_data from the data: the RMS of the 32×32 training pixels in [-1, 1] (0.97; mean −0.80, std 0.55 next to
    # the presets' 0.5), the spread around 0 that EDM's scalings assume
    "sigma_data_rms": ("--model.sigma_data=data",),
    # the teacher's σ law of EDM2 on ImageNet 64 (P_mean −0.8, P_std 1.6; EDM's −1.2, 1.2 before): σ > 3, where an
    # MNIST digit's shape is decided, gets 12 % of the samples instead of 3 %; the students keep theirs. It won
    # (teacher and students, both feature spaces): the ``mnist_edm`` preset's law since 2026-12-03
    "sigma_law_edm2": {"edm": EDM2_LAW},
}


# the arms whose teachers were trained with EDM's σ law, the ``mnist_edm`` preset's until ``sigma_law_edm2`` won
# (2026-12-03): pinned so that a rerun reproduces them now that the preset has EDM2's; later arms build on the winner
EDM_LAW_ARMS = ("fourier16", "fourier0.02", "positional_edm")


def arm_args(arm: str, base: str) -> tuple:
    """An arm's arguments for a preset stage: every stage's, or (a dict) those of the named stages only, after
    ``EDM_LAW`` for the teachers of ``EDM_LAW_ARMS``."""
    args = ARMS[arm].get(base, ()) if isinstance(ARMS[arm], dict) else ARMS[arm]
    return (*EDM_LAW, *args) if base == "edm" and arm in EDM_LAW_ARMS else args


STAGE_PRESETS = {  # stage → (preset, samplers scored at the final checkpoint, argument naming the teacher)
    "edm": ("mnist_edm.yaml", (HEUN10,), None),
    "cd": ("mnist_cd.yaml", (ONE_STEP, DEFAULT2), "--model.teacher"),
    "ect": ("mnist_ect.yaml", (ONE_STEP, DEFAULT2), "--model.init_from"),
    "ict": ("mnist_quickstart.yaml", (ONE_STEP, DEFAULT2), None),  # the quick-start, from scratch: no teacher
    "sct": ("mnist_sct.yaml", (ONE_STEP, DEFAULT2), "--model.init_from"),  # continuous time, from the weights
    "scd": ("mnist_scd.yaml", (ONE_STEP, DEFAULT2), "--model.teacher"),  # continuous time, from the velocity
}
# student variants: the base stage with its own arguments (the suspects that concern one method), and the
# preset run ``_x<k>`` times longer (its cosine decay, curriculum and tangent warm-up stretched alike)
VARIANTS = {
    "ect_edm_scalings": ("ect", ("--model.train_scalings=edm",)),  # ECT's code: f = D at the start
    "ect_stages8": ("ect", ("--model.num_stages=8",)),  # t − r shrinks to t/256 instead of t/16
    "cd_phema": ("cd", ()),  # from the teacher averaged with its best σ_rel (post-hoc EMA) …
    "ect_phema": ("ect", ()),  # … instead of its preset weights
    # sCT without the prior weight 1/σ: while the learned w_φ(t) is still near 0 (short runs), 1/σ alone weights
    # the loss, and under the preset's t law it leaves σ > 1 about 2 % of the gradient
    "sct_noprior": ("sct", ("--model.prior_weight=false",)),
    "scd_noprior": ("scd", ("--model.prior_weight=false",)),
    **{f"{base}_x{k}": (base, ()) for base in ("sct", "scd", "ect", "cd") for k in (2, 4)},
    # the ~15-minute path of the README's budget table: half the teacher (its cosine decay ends there), then ECT
    # for 1,000 steps from it, against the quick-start (``ict``) from scratch
    "edm_short": ("edm", ()),
    "ect_short": ("ect", ()),
    # the quick-start at the short path's 15.2 minutes (teacher included, 2026-12-03): 1,950 steps at the 128
    # steps/min that its full 3,400 steps ran at alone on the same machine that day (its cosine decay fitted)
    "ict_short": ("ict", ()),
}
# stage → its length in steps (schedules follow); the ~15-minute path's as the budget table defines it
SHORT = {"edm_short": STAGES["edm_short"].max_steps, "ect_short": STAGES["ect_short"].max_steps, "ict_short": 1950}


def teacher_of(stage: str) -> str:
    """The teacher stage a student stage starts from."""
    return "edm_short" if stage == "ect_short" else "edm"


def base_of(stage: str) -> tuple[str, tuple]:
    """The preset stage a (variant) stage trains, and its own arguments."""
    return VARIANTS.get(stage, (stage, ()))


def length_of(stage: str) -> int:
    """How many times its preset's length a stage trains: ``k`` for ``<base>_x<k>``, else 1."""
    head, _, tail = stage.rpartition("_x")
    return int(tail) if head and tail.isdigit() else 1


def stage_of(arm: str, stage: str) -> Stage:
    base, extra = base_of(stage)
    preset, samplers, teacher_arg = STAGE_PRESETS[base]
    k, max_steps = length_of(stage), SHORT.get(stage)
    if k > 1:  # every step count of the preset stretched: the warm-up stays the same fraction of the run
        config = preset_config(Stage(preset, ()))
        max_steps = k * config["trainer"]["max_steps"]
        warmup = config["model"]["init_args"].get("tangent_warmup_steps")
        extra = extra + ((f"--model.tangent_warmup_steps={k * warmup}",) if warmup else ())
    return Stage(preset, (), final_samplers=samplers, extra=arm_args(arm, base) + extra, teacher=teacher_arg and teacher_of(stage),
                 teacher_arg=teacher_arg or "--model.teacher", max_steps=max_steps, label=f"{arm}: {stage}")
