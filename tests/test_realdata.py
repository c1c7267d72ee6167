"""End-to-end runs on the real MNIST files (../shared/datasets); skipped without them."""
import json

import pytest

from tinyset.data import ImageDataset, load_dataset
from tinyset.evaluate import Protocol, evaluate_synset
from tinyset.methods.loop import distill
from tinyset.select import select

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def mnist(shared_datasets):
    return load_dataset("mnist", "train", root=shared_datasets), load_dataset("mnist", "test", root=shared_datasets)


@pytest.mark.slow
def test_random_selection_trains_a_convnet_on_real_mnist(mnist):
    train, test = mnist
    test = ImageDataset(test.info, "test", test.images[:2000], test.labels[:2000], test.source)  # for speed
    syn = select("random", train, 10, seed=0).synset
    proto = Protocol.preset("quick", epochs=60, num_models=1, precision="fp32", compile=False)
    res = evaluate_synset(syn, test, ["convnet"], proto, seed=0)
    r = res.results[0]
    assert len(r.accuracies) == 1 and res.to_dict()["kind"] == "evaluation"
    assert r.mean > 0.80  # 100 real images; the full 1000-epoch protocol gives about 93.5%


@pytest.mark.slow
def test_dm_on_real_mnist_lowers_its_loss_and_writes_a_loadable_set(mnist, tmp_path):
    train, _ = mnist
    syn = distill("dm", train, 1, tmp_path / "dm", preset="cpu",
                  overrides={"iterations": 30, "batch_real": 32, "init": "noise", "lr_img": 10.0},
                  seed=0, precision="fp32").synset
    losses = [json.loads(l)["loss"] for l in (tmp_path / "dm" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert syn.images.shape == (10, 1, 28, 28) and syn.info.name == "mnist"
