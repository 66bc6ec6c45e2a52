"""A training budget that drives its JPEG tensor to a destroying coarsest quality says so at its first measurement
(one line naming the tensor, its relative error and the smallest budget that keeps it under DAMAGE); a safe budget is
silent."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from codec.rd.allocate import DAMAGE
from codec.train import Budget, BudgetDamageWarning, finetune


def _jpeg_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))  # 16,384 weights: JPEG's size


def _batches():
    torch.manual_seed(1)
    return [(torch.randn(32, 128), torch.randint(0, 10, (32,))) for _ in range(2)]


def _finetune(budget: Budget) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune(_jpeg_net(), _batches(), nn.functional.cross_entropy, "jpeg,q12", steps=2, lr=1e-4, budget=budget,
                 validation=False)
    return [str(w.message) for w in caught if w.category is BudgetDamageWarning]


def test_a_budget_that_drives_the_tensor_to_a_destroying_coarsest_quality_says_so_at_once():
    said = _finetune(Budget(1.0))
    assert len(said) == 2 and "\n" not in said[0]
    assert "'0.weight'" in said[0] and "coarsest quality (q1" in said[0] and f"(over {DAMAGE})" in said[0]
    assert "may recover" in said[0]  # what is true when it is said: the loop has not trained yet
    need = float(said[0].split("; ")[-1].split()[0])
    assert not _finetune(Budget(need))  # the budget named keeps the tensor under the threshold: no warning


def test_the_end_of_the_loop_says_where_the_file_ends_after_a_damage_warning():
    budget = Budget(1.0)
    said = _finetune(budget)
    end = said[-1]
    assert end == budget.report and "\n" not in end
    assert end.startswith(f"finetune: budget: the file ends at {budget.bits:.4f} bits/weight, ")
    assert ("within the 1 bits/weight asked" if budget.within else "over the 1 bits/weight asked") in end
    assert f"'0.weight' at {budget.quality}: relative error " in end
    error = float(end.split("relative error ")[1].split()[0])
    assert (f"(over {DAMAGE}" in end) == (error > DAMAGE)
    assert ("codec.train.coded_weights" in end) == (error > DAMAGE)  # then where to measure what the file loses


def test_a_safe_budget_ends_silent_with_its_report_kept():
    budget = Budget(12.0)
    assert _finetune(budget) == []
    assert budget.report is not None and "within the 12 bits/weight asked" in budget.report
    assert f"(under {DAMAGE})" in budget.report


def test_a_budget_at_a_safe_quality_is_silent():
    assert _finetune(Budget(12.0)) == []
