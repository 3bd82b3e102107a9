"""Every classifier parameter, with its default, range and help text.

The CLI (``companion classify``), the RELION External job and the CryoSPARC job all build
their options from :class:`ClassifyParams` and validate through it, so a value means the
same thing everywhere. Defaults follow CryoSPARC's 2D classification.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from companion.errors import ParameterError


class ClassifyParams(BaseModel):
    """Parameters of one 2D classification run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    n_classes: int = Field(50, ge=1, le=5000, description="Number of 2D classes (K).")
    max_resolution: float = Field(
        6.0, gt=0, description="Maximum resolution used for alignment and classification (Å)."
    )
    particle_diameter: float | None = Field(
        None,
        gt=0,
        description="Circular mask diameter (Å). Default: 90% of the box.",
    )
    online_iters: int = Field(
        20, ge=0, description="Online-EM iterations over mini-batches before full passes."
    )
    batch_per_class: int = Field(
        100, ge=1, description="Mini-batch size per class in online EM (batch = this × K)."
    )
    full_iters: int = Field(2, ge=0, description="Full passes over all particles at the end.")
    anneal: Literal["on", "off"] = Field(
        "on",
        description=(
            "Annealing. 'on' (CryoSPARC's behaviour): the uncertainty factor decays to 1 and the "
            "noise model is re-estimated, which sharpens assignments but can funnel particles "
            "into a few 'attractor' classes and absorb junk into good classes. 'off': the "
            "uncertainty factor stays at --initial-uncertainty, the noise model stays at its "
            "initial estimate and the class priors are held uniform, which weakens the "
            "attractor; try it when junk or less-ordered species are absorbed into good "
            "classes. Sets the defaults of "
            "--uncertainty-schedule, --noise-model and --class-priors."
        ),
    )
    uncertainty_schedule: Literal["anneal", "constant"] | None = Field(
        None,
        description=(
            "Uncertainty factor schedule: 'anneal' (from --initial-uncertainty to 1 between "
            "--anneal-start and --anneal-start + --anneal-iters) or 'constant'. "
            "Default: from --anneal."
        ),
    )
    noise_model: Literal["estimated", "fixed", "white"] | None = Field(
        None,
        description=(
            "Noise power per resolution shell: 'estimated' from residuals each iteration, "
            "'fixed' at the initial estimate (the noise power of the background outside the "
            "mask, so junk's and the particles' own power stay out of it), or 'white' (that "
            "estimate's mean). Default: 'estimated' with --anneal on, "
            "'fixed' with --anneal off."
        ),
    )
    class_priors: Literal["estimated", "uniform"] | None = Field(
        None,
        description=(
            "Class priors in the E-step: 'estimated' from the class occupancies each "
            "iteration (RELION, CryoSPARC), or held 'uniform', so a class that is large "
            "does not attract particles for being large. While the uncertainty factor is "
            "above 1 it divides the likelihood but not the prior, so estimated priors then "
            "weigh u times more and a dominant class keeps growing. Default: 'estimated' with "
            "--anneal on, 'uniform' with --anneal off; always uniform with --balance."
        ),
    )
    scale_correction: Literal["off", "on"] = Field(
        "off",
        description=(
            "Per-particle intensity scale (RELION --scale, CryoSPARC 'minimize over "
            "per-particle scale'): 'on' fits each particle's scale to its best class at its "
            "best pose after every E-step (normalised to mean 1 over the particles) and uses "
            "it in the next; 'off' keeps 1."
        ),
    )
    initial_uncertainty: float = Field(
        2.0, ge=1.0, description="Initial classification uncertainty factor (temperature ≥ 1)."
    )
    anneal_start: int = Field(2, ge=0, description="Iteration at which annealing starts.")
    anneal_iters: int = Field(15, ge=1, description="Iterations over which annealing runs.")
    psi_step: float = Field(6.0, gt=0, le=90, description="In-plane rotation step (degrees).")
    max_shift: float = Field(
        0.1, ge=0, le=0.5, description="Shift search range as a fraction of the box."
    )
    shift_step: float = Field(1.0, gt=0, description="Shift step in working pixels.")
    tau2_fudge: float = Field(
        2.0, gt=0, description="Regularisation parameter T (RELION's --tau2_fudge)."
    )
    recenter: bool = Field(True, description="Re-centre class averages on their centre of mass.")
    pose_mode: Literal["max", "marginal"] = Field(
        "max",
        description=(
            "'max': best pose per class (CryoSPARC's 'force max over poses/shifts'); "
            "'marginal': full posterior over poses."
        ),
    )
    balance: Literal["off", "equal", "cap"] = Field(
        "off",
        description=(
            "Balanced classes. 'cap': no class may hold more than --max-per-class particles; "
            "'equal': every class holds about N/K particles (cap = ceil(slack × N / K)). "
            "Class priors are held uniform and each E-step solves a capacity-constrained "
            "assignment, so particles spread over all classes instead of collapsing into a "
            "few dominant ones; use it when extra classes stay empty or flexible-domain "
            "states are averaged away."
        ),
    )
    max_per_class: int | None = Field(
        None,
        ge=1,
        description="Cap on particles per class; needs --balance cap (an error without it).",
    )
    balance_slack: float = Field(
        1.0, ge=1.0, description="With --balance equal: cap = ceil(slack × N / K)."
    )
    reseed_empty: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description=(
            "Re-seed a class that falls below this fraction of the mean class size by splitting "
            "the largest class (0 = never)."
        ),
    )
    warmup_iters: int | None = Field(
        None,
        ge=0,
        description=(
            "First iterations in which class sizes are held equal (soft), so classes separate "
            "before one can take over the others; 0 = none. Default: max(3, online iters / 4); "
            "not used with --balance, which caps sizes throughout. 15 (of 20) raised state "
            "purity on simulated coloured-noise data, at some cost in junk separation "
            "(README, Warm-up)."
        ),
    )
    search: Literal["fast", "exhaustive"] = Field(
        "fast",
        description=(
            "Pose search. 'fast': a coarse pass (twice the psi and shift steps, half the "
            "resolution) over every class, then a full-resolution search around the best "
            "coarse pose of each class (like RELION's adaptive oversampling); 'exhaustive': "
            "every psi and shift at full resolution (several times slower)."
        ),
    )
    tf32: bool = Field(
        False,
        description=(
            "GPU only: let the coarse-pass GEMMs use TF32 tensor cores (faster on A100/H100, "
            "~3 significant digits in the products); the fine pass and the M-step stay float32. "
            "No effect on the CPU."
        ),
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description=(
            "Particles per compute batch. Default: from free device memory; lower it if the "
            "GPU runs out of memory."
        ),
    )
    memory_limit: str | None = Field(
        None,
        description=(
            "Host memory budget, e.g. 4G or 512M: batch sizes are chosen to fit it (the "
            "preprocessed images live in an on-disk cache, not in RAM). Default: half the "
            "available memory (within the cgroup/SLURM limit)."
        ),
    )
    drop_bad_images: bool = Field(
        False,
        description=(
            "Leave out images with NaN/Inf pixels (and report how many) instead of refusing to run."
        ),
    )
    posteriors: int = Field(
        3,
        ge=0,
        le=100,
        description=(
            "Class posteriors written per particle: the N most probable classes with their "
            "posteriors and log-likelihoods, from the last E-step (extra columns in "
            "run_itNNN_data.star, a 'posteriors' slot in particles.cs); 0 = none."
        ),
    )
    subclassify: bool = Field(
        False,
        description=(
            "After the main run, classify every big class again on its own particles, with "
            "the alignment redone inside the class (all big classes in ONE balanced run, each "
            "particle allowed only into its own class's sub-classes); sub-classes not "
            "significantly different from a sibling are merged back. The outputs hold one flat "
            "set of classes and each class's parent (companionParentClass, "
            "lineage/parent_class)."
        ),
    )
    subclassify_above: int | None = Field(
        None,
        ge=1,
        description="With --subclassify: split classes holding more than this many particles. "
        "Default: 2 × the mean class size.",
    )
    subclassify_k: int | None = Field(
        None,
        ge=2,
        le=100,
        description="With --subclassify: sub-classes per split class. Default: enough that each "
        "holds about the mean class size.",
    )
    subclassify_iters: int | None = Field(
        None,
        ge=0,
        description="With --subclassify: online-EM iterations of the sub-run, which starts from "
        "the parents' averages (then --full-iters full passes; --anneal-iters scaled by the "
        "same factor). Default: three quarters of --online-iters.",
    )
    stability: int = Field(
        0,
        ge=0,
        le=20,
        description="Per-particle stability: run R classifications in all (this one and R-1 "
        "more with other seeds, sharing its preprocessing; side by side on the workers with "
        "--cluster) and give each particle the mean over pairs of runs of the Jaccard index "
        "of its class in the one and in the other: 1 = always with the same partners "
        "(companionStability, stability/fraction); 0 or 1 = off.",
    )
    seed: int = Field(0, ge=0, description="Random seed; a run is reproducible on one backend.")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Compute device: 'gpu' needs CuPy and a CUDA GPU; 'auto' picks one."
    )
    cluster: str | None = Field(
        None,
        description=(
            "Run the E-step on a Dask cluster: 'local:N' (N worker processes here), 'gpus' "
            "(one worker per visible GPU, needs dask-cuda), 'tcp://HOST:PORT' (a running "
            "dask scheduler), 'slurm' or 'pbs' (workers submitted as batch jobs through "
            "dask-jobqueue; cores, memory, account etc. from ~/.config/dask/jobqueue.yaml). "
            "Same result as without it; needs pip install 'companion[cluster]'. "
            "Default: this process only."
        ),
    )
    cluster_jobs: int | None = Field(
        None,
        ge=1,
        description="With --cluster slurm|pbs: batch jobs to submit (one worker each). Default: 2.",
    )
    cluster_queue: str | None = Field(
        None,
        description="With --cluster slurm|pbs: queue (partition) of the worker jobs. "
        "Default: jobqueue.yaml's, else the scheduler's default.",
    )
    cluster_walltime: str | None = Field(
        None,
        description="With --cluster slurm|pbs: wall-time limit of each worker job, e.g. "
        "04:00:00. Default: jobqueue.yaml's.",
    )
    cluster_timeout: float = Field(
        300.0,
        gt=0,
        description="Seconds to wait for the scheduler to answer and the first worker to "
        "join (batch jobs may queue) before giving up with an error.",
    )

    @model_validator(mode="after")
    def _check(self) -> ClassifyParams:
        if self.cluster is not None:
            from companion.cluster.spec import parse_cluster

            parse_cluster(self.cluster)  # ValueError: one line naming the accepted forms
        jobq = (self.cluster_jobs, self.cluster_queue, self.cluster_walltime)
        if any(v is not None for v in jobq) and not (
            self.cluster and self.cluster.strip().lower() in ("slurm", "pbs")
        ):
            raise ValueError(
                "--cluster-jobs/--cluster-queue/--cluster-walltime are only used with "
                "--cluster slurm or --cluster pbs"
            )
        if self.memory_limit is not None:
            from companion.classify.backend import parse_size

            try:
                parse_size(self.memory_limit)
            except ValueError:
                raise ValueError(
                    f"--memory-limit {self.memory_limit!r}: expected a size such as 4G or 512M"
                ) from None
        if self.balance == "cap" and self.max_per_class is None:
            raise ValueError("--balance cap needs --max-per-class N")
        if self.max_per_class is not None and self.balance != "cap":
            raise ValueError(
                f"--max-per-class {self.max_per_class} is only used with --balance cap: add "
                "--balance cap (or drop --max-per-class)"
            )
        if not self.subclassify and (
            self.subclassify_above or self.subclassify_k or self.subclassify_iters is not None
        ):
            raise ValueError(
                "--subclassify-above / --subclassify-k / --subclassify-iters need --subclassify"
            )
        if self.balance != "off" and self.class_priors == "estimated":
            raise ValueError(
                "--class-priors estimated cannot be combined with --balance, which holds the "
                "priors uniform — drop one of them"
            )
        return self

    # Resolved knobs (what the run actually uses).
    @property
    def resolved_uncertainty_schedule(self) -> str:
        if self.uncertainty_schedule is not None:
            return self.uncertainty_schedule
        return "anneal" if self.anneal == "on" else "constant"

    @property
    def resolved_noise_model(self) -> str:
        if self.noise_model is not None:
            return self.noise_model
        return "estimated" if self.anneal == "on" else "fixed"

    @property
    def resolved_class_priors(self) -> str:
        if self.balance != "off":
            return "uniform"
        if self.class_priors is not None:
            return self.class_priors
        return "estimated" if self.anneal == "on" else "uniform"

    @property
    def total_iters(self) -> int:
        return self.online_iters + self.full_iters

    def class_cap(self, n_particles: int) -> int | None:
        """The most particles any class may hold, or None without a cap."""
        k = self.n_classes
        if self.balance == "cap":
            assert self.max_per_class is not None
            return int(self.max_per_class)
        if self.balance == "equal":
            return int(math.ceil(self.balance_slack * n_particles / k))
        return None

    def check_feasible(self, n_particles: int) -> None:
        """Raise ParameterError when the parameters cannot work for ``n_particles``."""
        cap = self.class_cap(n_particles)
        if cap is not None and cap * self.n_classes < n_particles:
            raise ParameterError(
                f"--max-per-class {cap} × {self.n_classes} classes holds only "
                f"{cap * self.n_classes} of {n_particles} particles — raise the cap to at least "
                f"{math.ceil(n_particles / self.n_classes)} or use more classes"
            )
        if self.n_classes > n_particles:
            raise ParameterError(
                f"{self.n_classes} classes for {n_particles} particles — use fewer classes"
            )

    @property
    def memory_limit_bytes(self) -> int | None:
        """--memory-limit in bytes (None: the default fraction of available memory)."""
        from companion.classify.backend import parse_size

        return None if self.memory_limit is None else parse_size(self.memory_limit)

    def resolved(self) -> dict[str, Any]:
        """Every value the run uses, with the annealing knobs resolved (for outputs)."""
        d = self.model_dump()
        d["uncertainty_schedule"] = self.resolved_uncertainty_schedule
        d["noise_model"] = self.resolved_noise_model
        d["class_priors"] = self.resolved_class_priors
        return d


#: --subclassify and its options: they act after the main run, so a continuation may change
#: them and the runs they start (the sub-run, --stability's extra runs) turn them off
SUBCLASSIFY_FIELDS = ("subclassify", "subclassify_above", "subclassify_k", "subclassify_iters")


def without_subclassify() -> dict[str, Any]:
    """The --subclassify fields at their defaults (off), for the runs it starts."""
    return {name: ClassifyParams.model_fields[name].default for name in SUBCLASSIFY_FIELDS}


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_params_arguments(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    only: Iterable[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    aliases: Mapping[str, tuple[str, ...]] | None = None,
    title: str = "classification parameters",
) -> None:
    """Add one ``--kebab-name`` option per model field: every command spells a parameter
    the same way. ``only``: a subset of the fields; ``defaults``: the command's own
    defaults (else the model's, applied at validation); ``aliases``: field -> deprecated
    old spellings, which warn when used."""
    from companion.commands.options import add_option

    group = parser.add_argument_group(title)
    defaults = dict(defaults or {})
    names = list(model.model_fields) if only is None else list(only)
    for name in names:
        info = model.model_fields[name]
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": defaults.get(name, argparse.SUPPRESS),
            "help": field_help(info, defaults.get(name, info.default)),
        }
        choices = field_choices(info)
        if info.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if choices is not None:
                kwargs["choices"] = choices
            kwargs["metavar"] = name.upper() if choices is None else None
            args = getattr(info.annotation, "__args__", ())
            number = next((t for t in (int, float) if t is info.annotation or t in args), None)
            if choices is None and number is not None:
                kwargs["type"] = number  # so every command sees numbers, not strings
        add_option(group, option_name(name), aliases=tuple((aliases or {}).get(name, ())), **kwargs)


def field_help(info: Any, default: Any) -> str:
    """A parameter's ``--help`` text (argparse-escaped) with its default."""
    text = (info.description or "").replace("%", "%%")
    return text if default is None else f"{text} [default: {default}]"


def field_choices(info: Any) -> list[str] | None:
    """The values of a ``Literal`` parameter (also ``Literal[...] | None``), else None."""
    ann = info.annotation
    literal = next(
        (
            a
            for a in (ann, *getattr(ann, "__args__", ()))
            if getattr(a, "__origin__", None) is Literal
        ),
        None,
    )
    return None if literal is None else list(literal.__args__)


def params_from_namespace(
    args: argparse.Namespace, model: type[BaseModel] = ClassifyParams, **overrides: Any
) -> Any:
    """Validate the parsed options into ``model``; errors become one-line ParameterErrors."""
    values = {k: getattr(args, k) for k in model.model_fields if hasattr(args, k)}
    values.update(overrides)
    return validate_params(values, model)


def validate_params(values: dict[str, Any], model: type[BaseModel] = ClassifyParams) -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            where = option_name(loc) if loc else "parameters"
            msg = err["msg"].removeprefix("Value error, ")
            msgs.append(f"{where}: {msg}" + (f" (got {err['input']!r})" if loc else ""))
        raise ParameterError("; ".join(msgs)) from None
