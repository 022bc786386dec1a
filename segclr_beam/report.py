"""How well classifiers on embeddings do: accuracy per variant, plain against SNGP,
out-of-distribution AUROC of the uncertainty, and the pictures (UMAP, confusion matrix).

`evaluate` trains on one tree and tests on another (or on held-out segments of the same
tree): node-level balanced accuracy and segment-level accuracy (each segment's majority
prediction against its majority label) for every variant side by side, and, with held-out
classes, the out-of-distribution AUROC: each held-out class in turn is left out of training,
and the Dempster-Shafer uncertainty (the same score for the plain and the SNGP head) has to
tell the test nodes of that class from the others. One class's AUROC rests on its few test
segments and varies from split to split; the table gives the mean over the held-out classes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

from segclr_beam import classify
from segclr_beam.evaluate import variant_trees
from segclr_beam.labels import Labels, labelled_nodes
from segclr_beam.reader import EmbeddingReader

HEADS = {"plain": False, "sngp": True}
TEST_FRACTION = 1 / 3  # segments held out for testing when no test root is given


@dataclasses.dataclass(frozen=True)
class Row:
    """The scores of one head trained on one variant for one task."""

    task: str
    variant: str
    head: str
    node_balanced_accuracy: float
    segment_accuracy: float
    ood_by_class: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @property
    def ood_auroc(self) -> float | None:
        """The mean OOD AUROC over the held-out classes; None without any in the task."""
        return float(np.mean(list(self.ood_by_class.values()))) if self.ood_by_class else None


@dataclasses.dataclass(frozen=True)
class Split:
    """Labelled nodes of one tree: embeddings, class names, segment ids."""

    embeddings: np.ndarray
    labels: np.ndarray
    segments: np.ndarray

    @classmethod
    def read(cls, tree: str, labels: Labels) -> "Split":
        nodes, names = labelled_nodes(tree, labels)
        return cls(nodes.features, names, nodes.segment_ids)

    def take(self, mask: np.ndarray) -> "Split":
        return Split(self.embeddings[mask], self.labels[mask], self.segments[mask])


def majority(values: np.ndarray) -> str:
    """The most frequent name, ties to the alphabetically first."""
    names, counts = np.unique(np.asarray(values, dtype=str), return_counts=True)
    return str(names[counts.argmax()])


def segment_accuracy(segments: np.ndarray, truth: np.ndarray, predicted: np.ndarray) -> float:
    """Fraction of segments whose most frequent predicted class is their most frequent label
    (ties to the alphabetically first class)."""
    right = [majority(truth[segments == s]) == majority(predicted[segments == s])
             for s in np.unique(segments)]
    return float(np.mean(right))


def _splits(train: str, test: str | None, labels: tuple[Labels, Labels],
            seed: int) -> tuple[Split, Split]:
    first = Split.read(train, labels[0])
    if test is not None:
        return first, Split.read(test, labels[1])
    test_nodes = classify.held_out(first.labels, first.segments, TEST_FRACTION, seed + 1)
    return first.take(~test_nodes), first.take(test_nodes)


def evaluate(train_root: str, test_root: str | None,
             tasks: Mapping[str, tuple[Labels, Labels]], variants: Sequence[str] | None = None,
             config: classify.ClassifierConfig = classify.ClassifierConfig(),
             holdout: Sequence[str] = (), keep: dict | None = None) -> list[Row]:
    """Rows of task x variant x head, training on `train_root`'s trees and testing on
    `test_root`'s (default: a third of the segments of `train_root`, held out). `tasks` maps
    a task name to its (train, test) labels; `variants` default to every tree of the run.
    Each class of `holdout` that a task has is left out of one more training per head and
    variant (`ood_by_class`). `keep`, if given, receives the SNGP classifier of the first
    task and last variant ("classifier", ready to save and apply) and its test predictions,
    for the pictures."""
    trees = variant_trees(train_root)
    tested = trees if test_root is None else variant_trees(test_root)
    variants = list(trees) if variants is None else list(variants)
    for name in variants:
        if name not in trees or name not in tested:
            raise ValueError(f"variant {name}: not a tree of {train_root}"
                             + ("" if test_root is None else f" and {test_root}")
                             + f" (they have {sorted(set(trees) & set(tested))})")
    if holdout and not any(set(holdout) & train.classes() for train, _ in tasks.values()):
        raise ValueError(f"held-out classes {sorted(holdout)}: no task has them")
    rows = []
    for task, labels in tasks.items():
        for variant in variants:
            train, test = _splits(trees[variant], None if test_root is None
                                  else tested[variant], labels, config.seed)
            # A class needs nodes on both sides of the split to be held out.
            ood = sorted(set(holdout) & set(train.labels.tolist()) & set(test.labels.tolist()))
            tree = classify.tree_input(trees[variant], EmbeddingReader(trees[variant]).info)
            for head, sngp in HEADS.items():
                head_config = dataclasses.replace(config, sngp=sngp)
                model = classify.train(train.embeddings, train.labels, train.segments,
                                       head_config, input=tree)
                probabilities, uncertainty = model.predict(test.embeddings)
                predicted = np.array(model.classes, dtype=object)[probabilities.argmax(axis=1)]
                known = np.isin(test.labels, model.classes)
                by_class = {name: _ood_auroc(train, test, name, head_config) for name in ood}
                rows.append(Row(task, variant, head,
                                classify.balanced_accuracy(test.labels[known].astype(str),
                                                           predicted[known].astype(str)),
                                segment_accuracy(test.segments, test.labels, predicted),
                                by_class))
                if keep is not None and sngp and task == next(iter(tasks)) \
                        and variant == variants[-1]:
                    keep.update(classifier=model, embeddings=test.embeddings,
                                labels=test.labels,
                                predicted=predicted, uncertainty=uncertainty,
                                classes=model.classes, variant=variant, task=task)
    return rows


def _ood_auroc(train: Split, test: Split, holdout: str,
               config: classify.ClassifierConfig) -> float:
    """Train without the class `holdout`; AUROC of the uncertainty for its test nodes."""
    kept = train.take(train.labels != holdout)
    model = classify.train(kept.embeddings, kept.labels, kept.segments, config)
    _, uncertainty = model.predict(test.embeddings)
    return classify.auroc(uncertainty, test.labels == holdout)


def format_rows(rows: Sequence[Row]) -> str:
    """The table: one line per task and head, a column group per variant."""
    variants = list(dict.fromkeys(r.variant for r in rows))
    ood = any(r.ood_auroc is not None for r in rows)
    metrics = ["node bal.acc", "segment acc"] + (["OOD AUROC"] if ood else [])
    header = f"{'task':<14}{'head':<7}" + "".join(
        f"{v + ' ' + m:>{max(len(v + ' ' + m) + 2, 12)}}" for v in variants for m in metrics)
    lines = [header]
    for task in dict.fromkeys(r.task for r in rows):
        for head in HEADS:
            by_variant = {r.variant: r for r in rows if r.task == task and r.head == head}
            cells = []
            for v in variants:
                r = by_variant[v]
                values = [r.node_balanced_accuracy, r.segment_accuracy] + (
                    [r.ood_auroc] if ood else [])
                cells += [f"{'-' if x is None else f'{x:.3f}':>{max(len(v + ' ' + m) + 2, 12)}}"
                          for x, m in zip(values, metrics)]
            lines.append(f"{task:<14}{head:<7}" + "".join(cells))
    return "\n".join(lines)


def format_ood(rows: Sequence[Row]) -> str:
    """The OOD AUROC of each held-out class: one line per task, head and variant."""
    lines = []
    for r in rows:
        if r.ood_by_class:
            lines.append(f"{r.task:<14}{r.head:<7}{r.variant:<10}" + "  ".join(
                f"{name} {value:.3f}" for name, value in r.ood_by_class.items()))
    return "\n".join(lines)


def pictures(directory: str, embeddings: np.ndarray, labels: np.ndarray,
             predicted: np.ndarray, uncertainty: np.ndarray, classes: Sequence[str],
             title: str = "", seed: int = 0) -> list[str]:
    """umap.png (the embeddings coloured by class and by uncertainty) and confusion.png
    (true against predicted class) in a local `directory`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import umap
    from sklearn.metrics import ConfusionMatrixDisplay
    from sklearn.neighbors import NearestNeighbors

    os.makedirs(directory, exist_ok=True)
    standardized = (embeddings - embeddings.mean(axis=0)) / np.maximum(embeddings.std(axis=0),
                                                                       1e-8)
    # Neighbours by scikit-learn: umap-learn's own search compiles for longer than the
    # few thousand nodes of a report take to embed.
    neighbours = int(min(15, max(2, len(embeddings) - 1)))
    distances, indices = NearestNeighbors(n_neighbors=neighbours).fit(
        standardized).kneighbors(standardized)
    xy = umap.UMAP(n_neighbors=neighbours, random_state=seed,
                   precomputed_knn=(indices, distances)).fit_transform(standardized)
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 6))
    for name in sorted(set(labels.tolist())):
        mine = labels == name
        left.scatter(xy[mine, 0], xy[mine, 1], s=6, label=f"{name} ({mine.sum()})")
    left.legend()
    left.set_title(f"UMAP of the embeddings by class ({title})")
    dots = right.scatter(xy[:, 0], xy[:, 1], s=6, c=uncertainty, cmap="viridis")
    figure.colorbar(dots, ax=right, label="Dempster-Shafer uncertainty")
    right.set_title("by the classifier's uncertainty")
    figure.tight_layout()
    umap_path = os.path.join(directory, "umap.png")
    figure.savefig(umap_path, dpi=100)
    plt.close(figure)

    names = sorted(set(labels.tolist()) | set(classes))
    figure, axis = plt.subplots(figsize=(6, 5))
    ConfusionMatrixDisplay.from_predictions(labels.tolist(), predicted.tolist(), labels=names,
                                            normalize="true", values_format=".2f", ax=axis,
                                            colorbar=False)
    axis.set_title(f"confusion ({title}; rows sum to 1)")
    figure.tight_layout()
    confusion_path = os.path.join(directory, "confusion.png")
    figure.savefig(confusion_path, dpi=100)
    plt.close(figure)
    return [umap_path, confusion_path]
