"""The public Python API: plain arguments in, typed results out."""
import json

from conftest import tiny_dataset
from tinyset.api import baseline, distill, evaluate, select
from tinyset.results import DistillationResult, EvaluationResult, SelectionResult, result_from_dict


def test_distill_select_evaluate_baseline_return_typed_results(tmp_path):
    train, test = tiny_dataset(), tiny_dataset(seed=1, split="test")
    run = distill("dm", train, 2, tmp_path / "run", sets={"iterations": "2", "model": "convnet-d1", "batch_real": 4},
                  precision="fp32")
    assert isinstance(run, DistillationResult) and run.iterations == 2 and run.synset.ipc == 2
    assert run.config_sources["iterations"] == "flag: --set iterations"
    sel = select("herding", train, 2, seed=0)
    assert isinstance(sel, SelectionResult) and len(sel.indices) == 6 and sel.scores.shape == (len(train),)
    ev = evaluate(run.synset, test, ["convnet-d1"], "quick", epochs=2, num_models=2, precision="fp32")
    assert isinstance(ev, EvaluationResult) and len(ev.score("convnet-d1").accuracies) == 2
    base = baseline(train, test, ["mlp"], "fulldata", epochs=1, num_models=1, precision="fp32")
    assert base.set["method"] == "full-dataset"
    for res in (run, sel, ev, base):  # one schema, readable back
        d = json.loads(json.dumps(res.to_dict()))
        assert d["schema"] == "tinyset.result" and d["schema_version"] == 1
        assert type(result_from_dict(d)) is type(res)
    again = result_from_dict(json.loads(json.dumps(ev.to_dict())))
    assert again.results[0].accuracies == ev.results[0].accuracies
