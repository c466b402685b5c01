"""The synthetic cohort: phantom heads put through THE SAME preprocessing as the daemon.

Each case is `imaging.phantoms.make_head(...)` -> `Volume.from_image(...)` ->
`imaging.preprocess.preprocess(volume, params)`, with params from
`imaging.preprocess.default_params(modality)` (recorded in the bundle). Results
are cached as npz files keyed by the params hash and the case description, so
epochs and reruns never repeat preprocessing.

Healthy ages are uniform in 20-85 years and split into train / validation /
calibration / test stratified by age; a small anomalous set (lesions of 3-40 mL) serves the
score-weight search (validation) and the model card's metrics (test).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from headscreen import imaging
from headscreen.errors import InputRejected
from headscreen.imaging import phantoms
from headscreen.imaging.preprocess import preprocess
from headscreen.imaging.qc import blocking_reasons
from headscreen.imaging.volume import Volume
from headscreen.model_training.runtime import Samples

log = logging.getLogger(__name__)

AGE_RANGE = (20.0, 85.0)
SPLITS = ("train", "val", "calibration", "test")
# Lesion kinds used as "anomalies": hemorrhage is the CT paper's TBI finding,
# tumour stands in for the MR paper's BraTS cases.
ANOMALY_KINDS = {"CT": ("hemorrhage",), "MR": ("tumour", "hemorrhage")}
# Log-uniform lesion volumes: as many 3-11 mL as 11-40 mL lesions, so the score-weight
# search and the model card see the small findings the benchmark targets (>= 5 mL).
LESION_ML = (3.0, 40.0)


@dataclass(frozen=True)
class Case:
    """One synthetic head: everything `make_head` needs, hence the cache key."""

    modality: str
    age: float
    seed: int
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0
    lesion_kind: str | None = None
    lesion_center_mni_mm: tuple[float, float, float] | None = None
    lesion_volume_ml: float | None = None
    randomise: bool = False  # domain-randomised appearance (imaging.synthesis)

    @property
    def lesion(self) -> phantoms.Lesion | None:
        if self.lesion_kind is None:
            return None
        return phantoms.Lesion(self.lesion_kind, self.lesion_center_mni_mm, self.lesion_volume_ml)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Prepared:
    image: np.ndarray  # model input (D, H, W) float32
    brain_mask: np.ndarray  # bool, same grid
    qc_reasons: tuple[str, ...]


@dataclass(frozen=True)
class CohortSpec:
    modality: str
    n_train: int
    n_val: int = 16
    n_calibration: int = 40
    n_test: int = 40
    n_anomalous_val: int = 16
    n_anomalous_test: int = 40
    seed: int = 0
    # Domain randomisation (imaging.synthesis): heads that vary like real scans, so
    # the model learns heads rather than the one template the phantoms come from.
    randomise: bool = True


@dataclass
class Cohort:
    spec: CohortSpec
    params: dict[str, Any]
    healthy: dict[str, Samples]  # by split
    healthy_masks: dict[str, np.ndarray]
    anomalous: dict[str, Samples]  # "val" and "test"
    anomalous_masks: dict[str, np.ndarray] = field(default_factory=dict)
    qc_excluded: int = 0
    cases: dict[str, list[Case]] = field(default_factory=dict)


def params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def imaging_fingerprint() -> str:
    """Hash of imaging's source: a cached case is only reused while the code that
    made it (phantoms, registration, preprocessing) is unchanged, not just its params."""
    digest = hashlib.sha256()
    for path in sorted(Path(imaging.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cache_folder(cache_dir: Path, params: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"{params_hash(params)}-{imaging_fingerprint()}"


def case_key(case: Case) -> str:
    return hashlib.sha256(json.dumps(asdict(case), sort_keys=True).encode()).hexdigest()[:20]


def prepare_case(case: Case, params: dict[str, Any], cache_dir: Path | None, folder: Path | None = None) -> Prepared:
    """Synthesize and preprocess one case, or read it from the cache (`folder`
    overrides the cache folder, e.g. the one a resumed run started with)."""
    path = None
    if folder is None and cache_dir is not None:
        folder = cache_folder(cache_dir, params)
    if folder is not None:
        path = Path(folder) / f"{case_key(case)}.npz"
        if path.is_file():
            with np.load(path) as cached:
                return Prepared(cached["image"], cached["brain_mask"], tuple(json.loads(str(cached["qc"]))))
    pose = phantoms.Pose(rotation_deg=case.rotation_deg, translation_mm=case.translation_mm)
    head = phantoms.make_head(case.modality, age=case.age, seed=case.seed, pose=pose, lesion=case.lesion,
                              scale=case.scale, randomise=case.randomise)
    volume = Volume.from_image(head.image, case.modality, series_uid=f"synthetic.{case.seed}")
    result = preprocess(volume, params)
    prepared = Prepared(
        np.asarray(result.model_input, dtype=np.float32),
        np.asarray(result.brain_mask, dtype=bool),
        tuple(result.qc_reasons),
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, image=prepared.image, brain_mask=prepared.brain_mask,
                            qc=json.dumps(list(prepared.qc_reasons)))
        tmp.replace(path)
    return prepared


def stratified_split(ages: np.ndarray, counts: dict[str, int]) -> dict[str, np.ndarray]:
    """Walk subjects in age order and give each to the split furthest behind its
    share, so every split spans the whole age range."""
    total = sum(counts.values())
    if total != len(ages):
        raise ValueError(f"counts sum to {total}, but there are {len(ages)} subjects")
    taken: dict[str, list[int]] = {name: [] for name in counts}
    for rank, index in enumerate(np.argsort(ages, kind="stable")):
        deficit = {n: counts[n] * (rank + 1) / total - len(taken[n]) for n in counts if len(taken[n]) < counts[n]}
        taken[max(deficit, key=lambda n: deficit[n])].append(int(index))
    return {name: np.array(sorted(idx), dtype=int) for name, idx in taken.items()}


def _random_pose(rng: np.random.Generator) -> dict[str, Any]:
    # Small positioning differences, as between real scans; registration undoes them.
    return {
        "rotation_deg": tuple(float(v) for v in rng.uniform(-6, 6, 3)),
        "translation_mm": tuple(float(v) for v in rng.uniform(-6, 6, 3)),
        "scale": float(rng.uniform(0.94, 1.06)),
    }


def healthy_cases(modality: str, n: int, seed: int, randomise: bool = False) -> list[Case]:
    """Case i depends only on (seed, i), so a larger cohort extends a smaller one
    and its cached cases are reused."""
    cases = []
    for i in range(n):
        rng = np.random.default_rng([seed, 1, i])
        age = float(round(rng.uniform(*AGE_RANGE), 1))
        cases.append(Case(modality, age, seed * 100_000 + i, **_random_pose(rng), randomise=randomise))
    return cases


def anomalous_cases(modality: str, n: int, seed: int, randomise: bool = False) -> list[Case]:
    kinds = ANOMALY_KINDS[modality]
    cases = []
    for i in range(n):
        rng = np.random.default_rng([seed, 2, i])
        age = float(round(rng.uniform(*AGE_RANGE), 1))
        side = rng.choice([-1.0, 1.0])
        center = (float(side * rng.uniform(15, 40)), float(rng.uniform(-50, 30)), float(rng.uniform(0, 40)))
        cases.append(Case(
            modality, age, seed * 100_000 + 50_000 + i, **_random_pose(rng),
            lesion_kind=kinds[i % len(kinds)], lesion_center_mni_mm=center,
            lesion_volume_ml=float(round(math.exp(rng.uniform(*np.log(LESION_ML))), 1)), randomise=randomise,
        ))
    return cases


def _single_threaded_itk() -> None:
    import SimpleITK as sitk

    from headscreen.imaging import concurrency
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    concurrency.set_threads(1)  # the processes already share the cores


def _prepare_all(cases: list[Case], params: dict[str, Any], cache_dir: Path | None, label: str,
                 progress: bool, folder: Path | None, jobs: int = 1) -> list[Prepared]:
    """Cases are independent, so `jobs` processes (one ITK thread each) share them;
    synthesis and registration dominate a cohort's build time. The bar (disable=None) is
    drawn on a terminal only: a log file gets no carriage returns."""
    if jobs <= 1 or len(cases) <= 1:
        return [prepare_case(c, params, cache_dir, folder)
                for c in tqdm(cases, desc=label, disable=None if progress else True, leave=False)]
    # spawn: the parent may hold torch and ITK thread pools that fork would copy half-alive.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(cases)), mp_context=context,
                             initializer=_single_threaded_itk) as pool:
        futures = [pool.submit(prepare_case, c, params, cache_dir, folder) for c in cases]
        return [f.result() for f in tqdm(futures, desc=label, disable=None if progress else True, leave=False)]


def _stack(cases: list[Case], prepared: list[Prepared]) -> tuple[Samples, np.ndarray]:
    images = np.stack([p.image for p in prepared]).astype(np.float32)
    masks = np.stack([p.brain_mask for p in prepared])
    return Samples(images, np.array([c.age for c in cases], dtype=np.float32)), masks


def build_healthy_samples(modality: str, n: int, seed: int, params: dict[str, Any], cache_dir: Path | None,
                          folder: Path | None, randomise: bool = True, progress: bool = True,
                          jobs: int = 1) -> Samples:
    """`n` more healthy heads (healthy_cases with `seed`), less those the daemon would not
    screen, as build_cohort leaves them out."""
    cases = healthy_cases(modality, n, seed, randomise)
    prepared = _prepare_all(cases, params, cache_dir, f"{modality} healthy, seed {seed}", progress, folder, jobs)
    keep = [i for i, p in enumerate(prepared) if not blocking_reasons(list(p.qc_reasons))]
    if not keep:
        raise InputRejected(f"every extra healthy {modality} case failed the preprocessing QC")
    return _stack([cases[i] for i in keep], [prepared[i] for i in keep])[0]


def build_cohort(spec: CohortSpec, params: dict[str, Any], cache_dir: Path | None, progress: bool = True,
                 folder: Path | None = None, jobs: int = 1, healthy_splits: tuple[str, ...] = SPLITS) -> Cohort:
    """All splits for one modality (healthy: those named in `healthy_splits`; the
    split of the others is the same, so a recalibration can skip "train").
    Healthy cases the daemon would not screen (a blocking QC reason, imaging.qc) are left
    out, as the CT paper's automatic QC does; ones with advisory reasons only (a suspected
    skull defect, say) stay, since the daemon screens them and calibration must see them."""
    counts = {"train": spec.n_train, "val": spec.n_val, "calibration": spec.n_calibration, "test": spec.n_test}
    cases = healthy_cases(spec.modality, sum(counts.values()), spec.seed, spec.randomise)
    split = stratified_split(np.array([c.age for c in cases]), counts)
    cohort = Cohort(spec=spec, params=params, healthy={}, healthy_masks={}, anomalous={})
    for name in (s for s in SPLITS if s in healthy_splits):
        chosen = [cases[i] for i in split[name]]
        prepared = _prepare_all(chosen, params, cache_dir, f"{spec.modality} {name}", progress, folder, jobs)
        keep = [i for i, p in enumerate(prepared) if not blocking_reasons(list(p.qc_reasons))]
        cohort.qc_excluded += len(prepared) - len(keep)
        chosen, prepared = [chosen[i] for i in keep], [prepared[i] for i in keep]
        if not chosen:
            raise InputRejected(f"every healthy {spec.modality} case of split {name!r} failed the preprocessing QC")
        cohort.healthy[name], cohort.healthy_masks[name] = _stack(chosen, prepared)
        cohort.cases[name] = chosen
    lesions = anomalous_cases(spec.modality, spec.n_anomalous_val + spec.n_anomalous_test, spec.seed, spec.randomise)
    for name, chosen in (("val", lesions[: spec.n_anomalous_val]), ("test", lesions[spec.n_anomalous_val:])):
        prepared = _prepare_all(chosen, params, cache_dir, f"{spec.modality} anomalous {name}", progress, folder, jobs)
        cohort.anomalous[name], cohort.anomalous_masks[name] = _stack(chosen, prepared)
        cohort.cases[f"anomalous_{name}"] = chosen
    log.info("cohort ready", extra={"action": "cohort_ready", "modality": spec.modality,
                                    "n_train": len(cohort.healthy["train"]) if "train" in cohort.healthy else 0,
                                    "qc_excluded": cohort.qc_excluded})
    return cohort
