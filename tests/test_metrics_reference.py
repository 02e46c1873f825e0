"""The metrics against the ASH/ReAct reference code, and where OpenOOD and pytorch-ood define FPR95
differently. Each reference below is written here from its source, loops and all:
- ASH/ReAct: `get_curve` and `cal_metric` of deeplearning-wisc/react util/metrics.py (andrijazz/ash
  utils/metrics.py is a copy);
- OpenOOD v1.0: `fpr_recall` of Jingkang50/OpenOOD openood/evaluators/metrics.py before v1.5;
- OpenOOD v1.5 and pytorch-ood: `auc_and_fpr_recall` (OpenOOD, "we treat OOD as positive") and
  `fpr_at_tpr` of kkirchheim/pytorch-ood src/pytorch_ood/utils/metrics.py (OOD positive, outlier
  score = minus ours).
"""

import numpy as np
import pytest

from featcache.metrics import ood_metrics


def reference_get_curve(known, novel):
    """get_curve, line for line (known, novel: ID and OOD scores)."""
    known, novel = np.sort(np.asarray(known, float)), np.sort(np.asarray(novel, float))
    all_ = np.sort(np.concatenate((known, novel)))
    num_k, num_n = known.shape[0], novel.shape[0]
    threshold = known[round(0.05 * num_k)]
    tp = -np.ones([num_k + num_n + 1], dtype=int)
    fp = -np.ones([num_k + num_n + 1], dtype=int)
    tp[0], fp[0] = num_k, num_n
    k, n = 0, 0
    for l in range(num_k + num_n):
        if k == num_k:
            tp[l + 1:] = tp[l]
            fp[l + 1:] = np.arange(fp[l] - 1, -1, -1)
            break
        elif n == num_n:
            tp[l + 1:] = np.arange(tp[l] - 1, -1, -1)
            fp[l + 1:] = fp[l]
            break
        else:
            if novel[n] < known[k]:
                n += 1
                tp[l + 1] = tp[l]
                fp[l + 1] = fp[l] - 1
            else:
                k += 1
                tp[l + 1] = tp[l] - 1
                fp[l + 1] = fp[l]
    j = num_k + num_n - 1
    for l in range(num_k + num_n - 1):
        if all_[j] == all_[j - 1]:
            tp[j] = tp[j + 1]
            fp[j] = fp[j + 1]
        j -= 1
    return tp, fp, np.sum(novel > threshold) / float(num_n)


def trapz(y, x):
    return float(sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1)))


def reference_cal_metric(known, novel):
    """cal_metric: FPR, AUROC, AUIN, AUOUT."""
    tp, fp, fpr95 = reference_get_curve(known, novel)
    tpr = np.concatenate([[1.], tp / tp[0], [0.]])
    fpr = np.concatenate([[1.], fp / fp[0], [0.]])
    auroc = -trapz(1. - fpr, tpr)
    denom = (tp + fp).astype(float)
    denom[denom == 0.] = -1.
    pin_ind = np.concatenate([[True], denom > 0., [True]])
    pin = np.concatenate([[.5], tp / denom, [0.]])
    auin = -trapz(pin[pin_ind], tpr[pin_ind])
    denom = (tp[0] - tp + fp[0] - fp).astype(float)
    denom[denom == 0.] = -1.
    pout_ind = np.concatenate([[True], denom > 0., [True]])
    pout = np.concatenate([[0.], (fp[0] - fp) / denom, [.5]])
    auout = trapz(pout[pout_ind], 1. - fpr[pout_ind])
    return {"fpr95": fpr95, "auroc": auroc, "aupr_in": auin, "aupr_out": auout}


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n_id", [20, 30, 50, 70, 137])  # round(0.05 n) rounds down, up, half-even
def test_metrics_are_the_reference_codes(rng, ties, n_id):
    for n_ood in (10, 61):
        id_s = rng.normal(1.0, 1.0, size=n_id)
        ood_s = rng.normal(0.0, 1.0, size=n_ood)
        if ties:  # ties within and across the splits, at the threshold too
            id_s, ood_s = np.round(id_s * 2) / 2, np.round(ood_s * 2) / 2
        mine, ref = ood_metrics(id_s, ood_s), reference_cal_metric(id_s, ood_s)
        for key in ref:
            assert mine[key] == pytest.approx(ref[key], abs=1e-12), key


def test_perfect_separation_as_the_reference_gives_it():
    mine = ood_metrics([3, 4, 5], [0, 1, 2])
    assert mine == pytest.approx(reference_cal_metric([3, 4, 5], [0, 1, 2]), abs=1e-12)
    # the closing (recall 0, precision 0) point costs half a step: 1 - 1/(2 * 3)
    assert mine == pytest.approx({"fpr95": 0.0, "auroc": 1.0, "aupr_in": 5 / 6, "aupr_out": 5 / 6})


# --- where other libraries differ, on one fixed example ------------------------------------------------

# 10 ID scores 1..10 and 5 OOD scores. Our (the reference's) threshold: round(0.05 * 10) = round(0.5) = 0
# (half to even), the lowest ID score, 1: every ID sample accepted; OOD above 1: 1.5, 2.5, 9.5, 12 -> 4/5.
ID = np.arange(1.0, 11.0)
OOD = np.array([0.5, 1.5, 2.5, 9.5, 12.0])


def openood_v1_fpr_recall(ind_conf, ood_conf, tpr=0.95):
    """OpenOOD v1.0 fpr_recall: threshold = the floor(0.95 n)-th largest ID score, OOD counted when > it."""
    recall_num = int(np.floor(tpr * len(ind_conf)))
    thresh = np.sort(ind_conf)[-recall_num]
    return np.sum(ood_conf > thresh) / len(ood_conf)


def ood_positive_fpr95(ind_conf, ood_conf, level=0.95):
    """OpenOOD v1.5 auc_and_fpr_recall and pytorch-ood fpr_at_tpr: OOD is the positive class, the outlier
    score is minus ours; the ROC point is the first (thresholds descending) detecting >= 95% of OOD, and
    FPR95 is the share of ID samples flagged there."""
    outlier_id, outlier_ood = -np.asarray(ind_conf), -np.asarray(ood_conf)
    thresholds = np.unique(np.r_[outlier_id, outlier_ood])[::-1]
    tpr = np.array([np.mean(outlier_ood >= t) for t in thresholds])
    fpr = np.array([np.mean(outlier_id >= t) for t in thresholds])
    return fpr[np.argmax(tpr >= level)]


def test_openood_and_pytorch_ood_fpr95_differ_from_ours_on_a_fixed_example():
    ours = ood_metrics(ID, OOD)["fpr95"]
    assert ours == pytest.approx(4 / 5) == reference_cal_metric(ID, OOD)["fpr95"]
    # OpenOOD v1.0: floor(9.5) = 9, the 9th largest ID score, 2, is the threshold (90% of ID accepted,
    # not 95%); OOD above 2: 2.5, 9.5, 12 -> 3/5
    assert openood_v1_fpr_recall(ID, OOD) == pytest.approx(3 / 5)
    # OOD positive: detecting >= 95% of the 5 OOD samples means all 5, down to the lowest (0.5):
    # every ID sample (1..10 > 0.5) is flagged as OOD -> 10/10
    assert ood_positive_fpr95(ID, OOD) == pytest.approx(1.0)
    assert len({ours, openood_v1_fpr_recall(ID, OOD), ood_positive_fpr95(ID, OOD)}) == 3


def test_ood_positive_fpr95_matches_sklearn_roc_as_openood_v15_calls_it():
    from sklearn.metrics import roc_curve

    labels = np.r_[np.zeros(len(ID)), np.ones(len(OOD))]  # OpenOOD v1.5: ood_indicator
    fpr_list, tpr_list, _ = roc_curve(labels, -np.r_[ID, OOD])
    assert fpr_list[np.argmax(tpr_list >= 0.95)] == ood_positive_fpr95(ID, OOD)


def test_progress_rows_of_older_metric_definitions_are_not_reused(tmp_path):
    import json

    from featcache.progress import ProgressStore

    out = tmp_path / "sweep.csv"
    row = {"method": "energy", "params": '{"T": 1}', "ood": "mean", "fpr95": 0.0, "auroc": 1.0, "aupr_in": 1.0,
           "aupr_out": 1.0, "id_acc": 1.0}
    # a line written before the metrics followed the reference code: same cache, other definitions
    old = {"fingerprint": "a" * 64, "method": "energy", "params": '{"T": 1}', "rows": [row]}
    (tmp_path / ".sweep.csv.progress.jsonl").write_text(json.dumps(old) + "\n")

    def store():
        return ProgressStore(out, "a" * 64, {"energy": "1"}, [], "id_test")

    assert not store().done
    store().add([row])
    assert store().done
    older = json.loads((tmp_path / ".sweep.csv.progress.jsonl").read_text().splitlines()[-1])
    older["metrics"] = "sklearn"  # the definitions before, with a digest that fits them
    from featcache.progress import content_digest

    older["digest"] = content_digest(older)
    (tmp_path / ".sweep.csv.progress.jsonl").write_text(json.dumps(older) + "\n")
    assert not store().done
