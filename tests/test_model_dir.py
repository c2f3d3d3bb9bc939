"""The model directory: verified on load, never unpickled."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from enrichment.errors import ModelError
from enrichment.model.classifier import Classifier, build_network, save_model_dir
from enrichment.model.spec import ClassSpec, ModelSpec, read_model_json
from tests.conftest import make_tiny_model


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def test_round_trip_gives_same_scores_and_version(tmp_path: Path) -> None:
    version = make_tiny_model(tmp_path / "a", seed=3)
    again = make_tiny_model(tmp_path / "b", seed=3)
    assert version == again and version.startswith("tiny@") and len(version) == len("tiny@") + 12
    first, second = Classifier.load(tmp_path / "a"), Classifier.load(tmp_path / "b")
    inputs = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    assert np.array_equal(first.scores(inputs), second.scores(inputs))
    assert first.version == version


def test_batch_scores_equal_one_at_a_time(tiny_model: Path) -> None:
    classifier = Classifier.load(tiny_model)
    inputs = np.random.default_rng(1).normal(size=(5, 3, 32, 32)).astype(np.float32)
    together = classifier.scores(inputs)
    alone = np.concatenate([classifier.scores(inputs[i : i + 1]) for i in range(5)])
    assert np.allclose(together, alone, atol=1e-5)


def test_thresholds_apply_per_class(model_copy: Path) -> None:
    classifier = Classifier.load(model_copy)
    classifier.thresholds = np.asarray([0.9, 0.2, 0.5], dtype=np.float32)
    labels = classifier.labels_above_threshold(np.asarray([0.85, 0.25, 0.5], dtype=np.float32))
    assert [(label.key, round(label.confidence, 2)) for label in labels] == [
        ("drawing", 0.25),
        ("map", 0.5),
    ]


def test_hash_mismatch_is_refused(model_copy: Path) -> None:
    document = json.loads((model_copy / "model.json").read_text())
    document["weights_sha256"] = "0" * 64
    (model_copy / "model.json").write_text(json.dumps(document))
    with pytest.raises(ModelError, match=r"do not belong to this model\.json"):
        Classifier.load(model_copy)


def test_label_count_not_matching_the_head_is_refused(model_copy: Path) -> None:
    document = json.loads((model_copy / "model.json").read_text())
    document["labels"].append(
        {"key": "extra", "label": "Extra", "concept": "http://example.org/extra"}
    )
    (model_copy / "model.json").write_text(json.dumps(document))
    with pytest.raises(ModelError, match="lists 4 classes but the weights' head has 3 outputs"):
        Classifier.load(model_copy)


def test_unknown_architecture_is_refused(model_copy: Path) -> None:
    document = json.loads((model_copy / "model.json").read_text())
    document["architecture"] = "resnet9000"
    (model_copy / "model.json").write_text(json.dumps(document))
    with pytest.raises(ModelError, match="unknown architecture 'resnet9000'"):
        Classifier.load(model_copy)


def test_pickle_in_place_of_safetensors_is_never_loaded(model_copy: Path) -> None:
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    weights = model_copy / "weights.safetensors"
    weights.unlink()
    torch.save({"boom": Boom()}, model_copy / "weights.pt")
    with pytest.raises(
        ModelError,
        match=r"no weights.safetensors \(found weights.pt: pickled checkpoints are never loaded\)",
    ):
        Classifier.load(model_copy)
    # A pickle renamed to the safetensors name is refused by the format, not executed.
    weights.write_bytes(pickle.dumps(Boom()))
    document = json.loads((model_copy / "model.json").read_text())
    import hashlib

    document["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (model_copy / "model.json").write_text(json.dumps(document))
    with pytest.raises(ModelError, match="is not a safetensors file"):
        Classifier.load(model_copy)


def test_missing_model_json(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"has no model\.json"):
        read_model_json(tmp_path / "empty")


def test_top_k_fallback_labels_the_best_classes_only_when_none_passes(model_copy: Path) -> None:
    assert Classifier.load(model_copy).spec.top_k_fallback == 0  # off unless model.json says
    below = np.asarray([0.3, 0.6, 0.45], dtype=np.float32)
    document = json.loads((model_copy / "model.json").read_text())
    document["top_k_fallback"] = 2
    (model_copy / "model.json").write_text(json.dumps(document))
    classifier = Classifier.load(model_copy)
    classifier.thresholds = np.asarray([0.9, 0.9, 0.9], dtype=np.float32)
    labels = classifier.labels_above_threshold(below)
    assert [(label.key, round(label.confidence, 2)) for label in labels] == [
        ("drawing", 0.6),
        ("map", 0.45),
    ]
    above = np.asarray([0.95, 0.6, 0.45], dtype=np.float32)
    assert [label.key for label in classifier.labels_above_threshold(above)] == ["photograph"]
    rows = classifier.decide(np.stack([below, above]))
    assert rows.tolist() == [[False, True, True], [True, False, False]]


def test_a_matrix_gets_the_labels_its_rows_get_one_at_a_time(model_copy: Path) -> None:
    """`labels_of` (the model stage's, a chunk at once) is `labels_above_threshold` per row."""
    document = json.loads((model_copy / "model.json").read_text())
    document["top_k_fallback"] = 1
    (model_copy / "model.json").write_text(json.dumps(document))
    classifier = Classifier.load(model_copy)
    classifier.thresholds = np.asarray([0.9, 0.2, 0.5], dtype=np.float64)
    scores = np.asarray(
        [[0.85, 0.25, 0.5], [0.95, 0.1, 0.49], [0.3, 0.1, 0.2], [0.9, 0.2, 0.5]], dtype=np.float64
    )
    together = classifier.labels_of(scores)
    assert together == [classifier.labels_above_threshold(row) for row in scores]
    assert [[label.key for label in labels] for labels in together] == [
        ["drawing", "map"],
        ["photograph"],
        ["photograph"],  # none passes: the fallback's best class
        ["photograph", "drawing", "map"],  # each exactly at its threshold
    ]
    assert all(type(label.confidence) is float for labels in together for label in labels)
    assert classifier.labels_of(np.empty((0, 3))) == []


def test_top_k_fallback_beyond_the_label_count_is_refused(model_copy: Path) -> None:
    document = json.loads((model_copy / "model.json").read_text())
    document["top_k_fallback"] = 4
    (model_copy / "model.json").write_text(json.dumps(document))
    with pytest.raises(ModelError, match=r"top_k_fallback must be between 0 \(off\) and"):
        Classifier.load(model_copy)


@pytest.mark.parametrize("architecture", ["mnasnet0_5", "shufflenet_v2_x0_5"])
def test_families_with_versioned_modules_round_trip(tmp_path: Path, architecture: str) -> None:
    """safetensors keeps no module version metadata; mnasnet refuses a state without it."""
    torch.manual_seed(0)
    network = build_network(architecture, 3).eval()
    classes = tuple(ClassSpec(key, key, f"http://example.org/{key}") for key in ("a", "b", "c"))
    save_model_dir(tmp_path, ModelSpec("fam", architecture, 32, classes), network)
    inputs = np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        expected = torch.sigmoid(network(torch.from_numpy(inputs))).numpy()
    assert np.allclose(Classifier.load(tmp_path).scores(inputs), expected, atol=1e-5)
