"""Post-processing (docs/ALGORITHM.md, "Post-processing"), on internal label maps 0/1/2/3: the paper's two
steps and four of ours.

1. Remove connected tumour components smaller than min(2000, 0.1 x Vmax) voxels.
2. When the case has little ET (vol_e / vol_t < 0.1), split the edema of ET-poor components into two
   K-means clusters; the cluster darker on T1c becomes NCR/NET. WT and ET never change in this step. By
   default (ours) only when the tumour does not enhance either: its largest ET component is under
   ``MIN_ENHANCING_VOXELS`` or fails step 3's enhancement check. The paper's premise is a network that
   misses the core of a tumour with little ET; where it found an enhancing tumour it found that tumour's
   core too, and the darker edema it leaves is mostly true edema (tuning phantoms: TC +0.044 over the
   paper's rule, docs/EXPERIMENTS.md). Then the ET that step 3 will take is false, and step 2's ET tests
   count it as absent: otherwise a component whose false specks add up to 1,000 voxels keeps its edema.
   ``edema_split`` DARK_TAIL (ours) relabels only the edema well below the median T1c instead of the darker
   cluster (app.options.EdemaSplit).
3. (Ours, not the paper's.) When the case's largest ET component has fewer than ``min_enhancing_voxels``
   voxels, all its ET becomes NCR/NET: a tumour without enhancement is common (low grade), and a few false
   ET voxels there cost the whole ET score, since BraTS scores an empty ET against an empty truth as 1 and
   anything else as 0. WT and TC never change in this step. The same happens to an ET whose largest
   component is under ``enhancement_check_voxels`` and that does not enhance: on T1c against T1 (z-scored
   in the brain) it is less than ``min_enhancement`` brighter than the tissue around it; steps 2 and 3 then
   treat the tumour as non-enhancing. The check is what lets the size floor sit at 100 voxels rather than
   300: a small ET that takes up contrast is a small enhancing tumour (docs/EXPERIMENTS.md, "Step 3's
   enhancement check").
4. (Ours.) A tumour's centre is its core: (a) non-tumour voxels that the tumour encloses in an axial,
   coronal or sagittal slice become NCR/NET when their connected hole touches the predicted core (the
   network reads a necrotic centre that does not enhance, dark on T1, T1c and FLAIR, as brain); (b) what
   the core then encloses in such a slice becomes NCR/NET (it reads a large necrotic centre inside an
   enhancing rim as edema). Only scanned voxels (T1c not 0) change; ET never changes.
5. (Ours.) A tumour component whose mean task-1 tumour probability (fold-averaged) is under even odds is
   removed: task 2, which decides within 5 voxels of task 1's tumour, called it tumour, but the ensemble's
   whole-brain task reads its voxels as more likely brain than tumour (tuning phantoms: 16 such components
   removed, none holding tumour, 12 of them all edema; WT +0.012, docs/EXPERIMENTS.md). When no component
   holding core (NCR/NET or ET) reaches even odds, one component stays, so a case always keeps a tumour: the
   one holding the most core, the largest where none holds core (``keep_largest`` MOST_CORE, the default
   since round 52: a small enhancing tumour the whole-brain task doubted had given way to larger edema alone).
   When one does, a larger doubtful one goes too (since round 46: cortex read as edema, larger than the
   tumour beside it; the core since round 49, as sure edema alone also took a tumour's place).
   WHEN_NONE_SURE spares the largest instead (rounds 46-51); ALWAYS keeps the largest whatever, as before.
6. (Ours.) Islands of core go: an ET component of fewer than ``min_island_voxels`` voxels (not the largest)
   becomes NCR/NET, then a core (NCR/NET or ET) component of fewer (not the largest) becomes edema. The
   ensemble leaves specks of core of a few voxels in the edema (about 21 per case on 128 phantoms); the
   legacy Dice barely sees them, but BraTS's lesion-wise scores (since 2023) count each one far from the
   truth's core as a false-positive lesion, scoring 0 (round 58, docs/EXPERIMENTS.md: lesion-wise TC and ET
   0.590 -> 0.669 on 128 held-out phantoms, legacy Dice +0.0002).
"""

from __future__ import annotations

from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage
from sklearn.cluster import KMeans

from .conventions import EDEMA, ENHANCING, NECROSIS, core_mask
from .options import (
    DARK_TAIL_SPREADS,
    ENHANCEMENT_CHECK_VOXELS,
    MIN_ENHANCEMENT,
    MIN_ENHANCING_VOXELS,
    MIN_ISLAND_VOXELS,
    EdemaRelabel,
    EdemaSplit,
    KeepLargest,
    parse_option,
)
from .preprocess import bounding_box, enclosed_in_a_slice, zscore

# 26-connectivity: components touching at a corner are one tumour.
CONNECTIVITY = 26
MIN_COMPONENT_CAP = 2000
MIN_COMPONENT_FRACTION = 0.1
# Step 5: a component whose mean task-1 tumour probability is under this goes (even odds, not a tuned value).
DOUBTFUL_TUMOUR_PROBABILITY = 0.5
CASE_ET_RATIO = 0.1
COMPONENT_ET_RATIO = 0.05
COMPONENT_ET_MAX = 1000
# Step 3's enhancement check compares the ET with the tissue within this many voxels of it.
ENHANCEMENT_SHELL = 2


@dataclass(frozen=True)
class PostprocessConfig:
    remove_small_components: bool = True
    edema_relabel: EdemaRelabel = EdemaRelabel.NON_ENHANCING  # step 2: when it runs
    edema_split: EdemaSplit = EdemaSplit.K_MEANS  # step 2: which edema it relabels
    min_enhancing_voxels: int = MIN_ENHANCING_VOXELS  # step 3; 0 switches it off
    enhancement_check_voxels: int = ENHANCEMENT_CHECK_VOXELS  # step 3's enhancement check; 0 switches it off
    min_enhancement: float = MIN_ENHANCEMENT
    fill_enclosed_core: bool = True  # step 4
    drop_doubtful_components: bool = True  # step 5; needs the task-1 tumour probability
    keep_largest: KeepLargest = KeepLargest.MOST_CORE  # step 5: which component stays when none vouches
    min_island_voxels: int = MIN_ISLAND_VOXELS  # step 6; 0 switches it off

    def __post_init__(self):
        object.__setattr__(self, "edema_relabel", parse_option(EdemaRelabel, self.edema_relabel, "edema_relabel"))
        object.__setattr__(self, "edema_split", parse_option(EdemaSplit, self.edema_split, "edema_split"))
        object.__setattr__(self, "keep_largest", parse_option(KeepLargest, self.keep_largest, "keep_largest"))
        if self.min_enhancing_voxels < 0:
            raise ValueError(f"min_enhancing_voxels must be >= 0, got {self.min_enhancing_voxels}")
        if self.enhancement_check_voxels < 0:
            raise ValueError(f"enhancement_check_voxels must be >= 0, got {self.enhancement_check_voxels}")
        if self.min_island_voxels < 0:
            raise ValueError(f"min_island_voxels must be >= 0, got {self.min_island_voxels}")

    @property
    def checks_enhancement(self) -> bool:
        """Whether step 3's enhancement check runs: part of step 3, so off with it."""
        return self.min_enhancing_voxels > 0 and self.enhancement_check_voxels > 0

    @classmethod
    def off(cls) -> PostprocessConfig:
        """No post-processing at all."""
        return cls(remove_small_components=False, edema_relabel=EdemaRelabel.OFF, min_enhancing_voxels=0,
                   enhancement_check_voxels=0, fill_enclosed_core=False, drop_doubtful_components=False,
                   min_island_voxels=0)


def remove_small_components(labels: np.ndarray) -> np.ndarray:
    """Step 1: drop tumour components under min(2000, 0.1 x largest component) voxels."""
    tumour = labels > 0
    if not tumour.any():
        return labels.copy()
    box, components, sizes = _components(tumour)
    threshold = min(MIN_COMPONENT_CAP, MIN_COMPONENT_FRACTION * sizes.max())
    small = np.flatnonzero(sizes < threshold) + 1
    out = labels.copy()
    out[box][np.isin(components, small)] = 0
    return out


def _components(mask: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """The connected components of a non-empty ``mask`` within its bounding box (the same components as over
    the whole volume, faster): the box, the component labels there, and each component's size in voxels
    (label 1 first)."""
    box = bounding_box(mask)
    components = cc3d.connected_components(mask[box], connectivity=CONNECTIVITY)
    return box, components, np.bincount(components.ravel())[1:]


def relabel_dark_edema(labels: np.ndarray, t1c: np.ndarray, seed: int = 0, count_enhancing: bool = True,
                       split: EdemaSplit | str = EdemaSplit.K_MEANS) -> np.ndarray:
    """Step 2: in cases with little ET, the dark part (``split``) of ET-poor components' edema on T1c ->
    NCR/NET. With ``count_enhancing`` False the ET is taken as absent in those tests (ET that step 3 will
    take)."""
    split = parse_option(EdemaSplit, split, "split")
    tumour = labels > 0
    counted = (labels == ENHANCING) if count_enhancing else np.zeros_like(tumour)
    vol_t, vol_e = int(tumour.sum()), int(counted.sum())
    out = labels.copy()
    if vol_t == 0 or vol_e / vol_t >= CASE_ET_RATIO:
        return out
    box, components, sizes = _components(tumour)
    inside, dark, relabelled = labels[box], t1c[box], out[box]  # `relabelled` is a view: writes reach `out`
    enhancing = np.bincount(components[counted[box]], minlength=len(sizes) + 1)[1:]
    all_edema = inside == EDEMA
    for n in np.flatnonzero((enhancing / sizes < COMPONENT_ET_RATIO) & (enhancing < COMPONENT_ET_MAX)) + 1:
        edema = (components == n) & all_edema
        values = dark[edema].astype(np.float64)
        if len(values) < 2 or np.ptp(values) == 0:
            continue
        where = np.nonzero(edema)
        taken = _darker_cluster(values, seed) if split is EdemaSplit.K_MEANS else _dark_tail(values)
        relabelled[tuple(axis[taken] for axis in where)] = NECROSIS
    return out


def _darker_cluster(values: np.ndarray, seed: int) -> np.ndarray:
    """Which of ``values`` fall in the darker of their two K-means clusters (the paper's split)."""
    clusters = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(values.reshape(-1, 1))
    return clusters.labels_ == int(np.argmin(clusters.cluster_centers_.ravel()))


def _dark_tail(values: np.ndarray) -> np.ndarray:
    """Which of ``values`` lie more than DARK_TAIL_SPREADS robust standard deviations below their median."""
    median = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - median))  # the MAD scaled to a normal's standard deviation
    return values < median - DARK_TAIL_SPREADS * spread


def postprocess(labels: np.ndarray, t1c: np.ndarray, config: PostprocessConfig = PostprocessConfig(),
                tumour_probability: np.ndarray | None = None, t1: np.ndarray | None = None) -> np.ndarray:
    """Apply the enabled steps in order; ``t1c`` and ``t1`` are the case's T1c and T1 intensities and
    ``tumour_probability`` the ensemble's fold-averaged task-1 tumour probability (all the labels' shape; the
    probability is needed only by step 5, T1 only by step 3's enhancement check)."""
    if labels.shape != t1c.shape:
        raise ValueError(f"labels {labels.shape} and T1c {t1c.shape} differ in shape")
    if config.drop_doubtful_components:
        if tumour_probability is None:
            raise ValueError("post-processing step 5 (drop_doubtful_components) needs the task-1 tumour "
                             "probability: pass tumour_probability or switch the step off")
        if tumour_probability.shape != labels.shape:
            raise ValueError(f"labels {labels.shape} and tumour probability {tumour_probability.shape} differ "
                             "in shape")
    if config.checks_enhancement:
        if t1 is None:
            raise ValueError("post-processing step 3's enhancement check needs the T1 image: pass t1 or switch "
                             "the check off (enhancement_check_voxels=0)")
        if t1.shape != labels.shape:
            raise ValueError(f"labels {labels.shape} and T1 {t1.shape} differ in shape")
    out = labels
    if config.remove_small_components:
        out = remove_small_components(out)
    # Step 2 leaves ET as it is, so whether the tumour enhances is decided once, for steps 2 and 3.
    enhances = not config.checks_enhancement or tumour_enhances(out, t1c, t1, config.enhancement_check_voxels,
                                                                 config.min_enhancement)
    if _relabels_edema(config, out, enhances):
        out = relabel_dark_edema(out, t1c, count_enhancing=not _step3_takes_all_enhancement(config),
                                 split=config.edema_split)
    if config.min_enhancing_voxels > 0:
        out = drop_scant_enhancement(out, config.min_enhancing_voxels)
    if not enhances:
        out = relabel_enhancement(out)
    if config.fill_enclosed_core:
        out = fill_enclosed_core(out, t1c != 0)
    if config.drop_doubtful_components:
        out = drop_doubtful_components(out, tumour_probability, keep_largest=config.keep_largest)
    if config.min_island_voxels > 0:
        out = drop_core_islands(out, config.min_island_voxels)
    return out


def _relabels_edema(config: PostprocessConfig, labels: np.ndarray, enhances: bool) -> bool:
    """Whether step 2 runs on these (step-1) labels; the case's own ET condition is checked inside it. A
    tumour does not enhance where step 3 would take its ET (its floor, or the default floor with step 3 off,
    so that switching step 3 off leaves step 2 as it was)."""
    if config.edema_relabel is EdemaRelabel.NON_ENHANCING:
        floor = config.min_enhancing_voxels or MIN_ENHANCING_VOXELS
        return not (enhances and has_enhancing_tumour(labels == ENHANCING, floor))
    return config.edema_relabel is EdemaRelabel.PAPER


def _step3_takes_all_enhancement(config: PostprocessConfig) -> bool:
    """Whether, where step 2 runs, step 3 will relabel all of the case's ET: then that ET is false and must
    not shield a component from step 2's split (the paper's rule counts the ET as predicted). The default
    step 2 (ours) runs only where the tumour does not enhance or its largest ET is under step 3's floor,
    which is exactly where step 3, when on, takes all of it; with step 3 off the ET stays and counts."""
    return config.edema_relabel is EdemaRelabel.NON_ENHANCING and config.min_enhancing_voxels > 0


def has_enhancing_tumour(enhancing: np.ndarray, min_voxels: int) -> bool:
    """Whether the largest component of the ET mask ``enhancing`` has at least ``min_voxels`` voxels."""
    return bool(enhancing.any()) and _largest_component(enhancing) >= min_voxels


def drop_scant_enhancement(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """Step 3: a case whose largest ET component has fewer than ``min_voxels`` voxels has all its ET
    relabelled NCR/NET. The largest component rather than the total: an enhancing rim is one connected
    structure, while false enhancement in a non-enhancing tumour can come as several specks."""
    enhancing = labels == ENHANCING
    if not enhancing.any() or has_enhancing_tumour(enhancing, min_voxels):
        return labels
    return relabel_enhancement(labels)


def relabel_enhancement(labels: np.ndarray) -> np.ndarray:
    """All ET becomes NCR/NET (step 3's outcome for a tumour that does not enhance)."""
    enhancing = labels == ENHANCING
    if not enhancing.any():
        return labels
    out = labels.copy()
    out[enhancing] = NECROSIS
    return out


def tumour_enhances(labels: np.ndarray, t1c: np.ndarray, t1: np.ndarray, check_below_voxels: int,
                    min_enhancement: float) -> bool:
    """Step 3's enhancement check: False when the predicted ET's largest component is under
    ``check_below_voxels`` and its `enhancement` is under ``min_enhancement``; True otherwise (also with no ET,
    which the size rule handles, or with the check off, ``check_below_voxels`` 0). Only a small ET is
    checked: false enhancement in a non-enhancing tumour comes as up to a few hundred voxels (phantoms:
    largest components of 595-637 voxels, enhancement 0.34-0.81 on the N4-corrected images), where a true
    ET under 1000 voxels mostly enhances clearly (14 of 17 at 1.6-5.9, the others 0.60-0.84)."""
    enhancing = labels == ENHANCING
    if check_below_voxels == 0 or not enhancing.any():
        return True
    if _largest_component(enhancing) >= check_below_voxels:
        return True
    return enhancement(enhancing, t1c, t1) >= min_enhancement


def enhancement(enhancing: np.ndarray, t1c: np.ndarray, t1: np.ndarray) -> float:
    """How much brighter the ``enhancing`` voxels are on T1c than on T1, against the brain within
    ``ENHANCEMENT_SHELL`` voxels around them: the median of z(T1c) - z(T1) inside minus that median around,
    in brain standard deviations (each image z-scored inside the brain, where either is nonzero). What
    contrast uptake is: a T1c-bright region that is as bright on T1 (fat, blood, a bright cortex) does not
    enhance. Around rather than the whole brain, so that a bias field or a tissue mix elsewhere does not
    count."""
    brain = (t1c != 0) | (t1 != 0)
    if not enhancing.any():
        raise ValueError("enhancement needs at least one enhancing voxel")
    box = bounding_box(enhancing, margin=ENHANCEMENT_SHELL + 1)
    inside = enhancing[box]
    around = ndimage.binary_dilation(inside, iterations=ENHANCEMENT_SHELL) & ~inside & brain[box]
    if not around.any():
        return float("inf")  # nothing to compare with: leave the ET as it is
    difference = zscore(t1c, brain)[box] - zscore(t1, brain)[box]  # each z-scored as the networks read it
    return float(np.median(difference[inside]) - np.median(difference[around]))


def _largest_component(mask: np.ndarray) -> int:
    return int(_components(mask)[2].max())


def fill_enclosed_core(labels: np.ndarray, scanned: np.ndarray) -> np.ndarray:
    """Step 4: a tumour's centre is its core. (a) ``scanned`` voxels that the tumour encloses in some slice
    become NCR/NET, one connected hole at a time and only a hole that touches the predicted core (NCR/NET or
    ET); (b) then whatever the core encloses in some slice (edema, or brain that only edema touches) becomes
    NCR/NET too. ET never changes."""
    return _fill_inside_core(_fill_holes_touching_core(labels, scanned), scanned)


def _fill_holes_touching_core(labels: np.ndarray, scanned: np.ndarray) -> np.ndarray:
    """Step 4a. A necrotic centre lies against its core; holes that only edema encloses are, off the training
    distribution, islands of cortex inside a false edema (out-of-distribution sweep: filling those took a
    case's TC from 0.85 to 0.49)."""
    tumour = labels > 0
    if not tumour.any():
        return labels
    # A hole lies within the tumour's bounding box; working only there takes ms instead of ~0.4 s.
    box = bounding_box(tumour)
    holes = enclosed_in_a_slice(tumour[box]) & scanned[box]
    if not holes.any():
        return labels
    components = cc3d.connected_components(holes, connectivity=CONNECTIVITY)
    core = core_mask(labels[box])
    next_to_core = ndimage.binary_dilation(core, structure=np.ones((3,) * labels.ndim, bool))
    touching = np.unique(components[next_to_core & holes])
    fill = np.isin(components, touching[touching > 0])
    if not fill.any():
        return labels
    out = labels.copy()
    out[box][fill] = NECROSIS
    return out


def _fill_inside_core(labels: np.ndarray, scanned: np.ndarray) -> np.ndarray:
    """Step 4b. Edema lies around a core, not inside it: the network reads a large necrotic centre inside an
    enhancing rim as edema (tuning phantoms: P(edema) 0.3-0.65 and P(NCR) under 0.11 on the missed core), and
    a hole in that edema touches no core, so step 4a leaves it."""
    core = core_mask(labels)
    if not core.any():
        return labels
    box = bounding_box(core)
    inside = enclosed_in_a_slice(core[box]) & scanned[box]
    if not inside.any():
        return labels
    out = labels.copy()
    out[box][inside] = NECROSIS
    return out


def holds_sure_component(labels: np.ndarray, tumour_probability: np.ndarray,
                         threshold: float = DOUBTFUL_TUMOUR_PROBABILITY) -> bool:
    """Whether some tumour component of ``labels`` vouches for itself as the tumour: its mean
    ``tumour_probability`` reaches ``threshold`` and it holds core (NCR/NET or ET). Such a component lets step 5
    remove a larger doubtful one."""
    tumour = labels > 0
    if not tumour.any():
        return False
    box, components, sizes = _components(tumour)
    means = _component_means(components, sizes, tumour_probability[box])
    return bool(_vouching(means, _core_counts(components, sizes, labels[box]), threshold).any())


def _vouching(means: np.ndarray, cores: np.ndarray, threshold: float) -> np.ndarray:
    """Per component: whether its mean probability (``means``, from `_component_means`) reaches ``threshold``
    and it holds core (``cores``, from `_core_counts`)."""
    return (means >= threshold) & (cores > 0)


def _core_counts(components: np.ndarray, sizes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The core (NCR/NET or ET) voxels of each component (label 1 first, over the same box as ``labels``)."""
    return np.bincount(components.ravel(), weights=core_mask(labels).ravel(), minlength=sizes.size + 1)[1:]


def _spared(sizes: np.ndarray, cores: np.ndarray, keep_largest: KeepLargest) -> np.ndarray:
    """Per component: whether step 5 spares it however doubtful, where it spares one. The largest; with
    MOST_CORE the one holding the most core, the largest only where none holds core."""
    if keep_largest is KeepLargest.MOST_CORE and cores.max() > 0:
        return cores == cores.max()
    return sizes == sizes.max()


def _component_means(components: np.ndarray, sizes: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """The mean ``probability`` of each component (label 1 first) of ``components``, over the same box."""
    return np.bincount(components.ravel(), weights=probability.ravel())[1:] / sizes


def drop_doubtful_components(labels: np.ndarray, tumour_probability: np.ndarray,
                             threshold: float = DOUBTFUL_TUMOUR_PROBABILITY,
                             keep_largest: KeepLargest | str = KeepLargest.MOST_CORE) -> np.ndarray:
    """Step 5: remove every tumour component whose mean ``tumour_probability`` is under ``threshold``, but
    the one ``keep_largest`` spares (app.options.KeepLargest): ALWAYS, the largest (the case's tumour, however
    unsure the ensemble is of it); WHEN_NONE_SURE, the largest only when no component both reaches
    ``threshold`` and holds core (NCR/NET or ET); MOST_CORE (the default), as WHEN_NONE_SURE but the one
    holding the most core (the largest where none holds core). A sure component of edema alone does not vouch
    for itself as the tumour: on the out-of-distribution sweep's thicker cortex one such (2,852 voxels at 0.53)
    took the place of a tumour merged with cortex into a component just under even odds (docs/MEASUREMENTS.md,
    step 5)."""
    keep_largest = parse_option(KeepLargest, keep_largest, "keep_largest")
    tumour = labels > 0
    if not tumour.any():
        return labels
    box, components, sizes = _components(tumour)
    if sizes.size < 2:
        return labels
    means = _component_means(components, sizes, tumour_probability[box])
    cores = _core_counts(components, sizes, labels[box])
    doubtful = means < threshold
    if keep_largest is KeepLargest.ALWAYS or not _vouching(means, cores, threshold).any():
        doubtful &= ~_spared(sizes, cores, keep_largest)
    doomed = np.flatnonzero(doubtful) + 1
    if doomed.size == 0:
        return labels
    out = labels.copy()
    out[box][np.isin(components, doomed)] = 0
    return out


def _relabel_islands(labels: np.ndarray, mask: np.ndarray, becomes: int, min_voxels: int) -> np.ndarray:
    """``labels`` with the components of ``mask`` under ``min_voxels`` voxels, but the largest, set to
    ``becomes``."""
    if not mask.any():
        return labels
    box, components, sizes = _components(mask)
    small = sizes < min_voxels
    small[np.argmax(sizes)] = False
    if not small.any():
        return labels
    out = labels.copy()
    out[box][np.isin(components, np.flatnonzero(small) + 1)] = becomes
    return out


def drop_core_islands(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """Step 6: ET components under ``min_voxels`` voxels (not the largest) become NCR/NET, then core components
    under ``min_voxels`` (not the largest) become edema. WT never changes."""
    out = _relabel_islands(labels, labels == ENHANCING, NECROSIS, min_voxels)
    return _relabel_islands(out, core_mask(out), EDEMA, min_voxels)
