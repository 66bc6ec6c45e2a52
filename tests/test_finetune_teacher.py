"""codec.train.finetune's ``teacher``: distillation towards another model than the student's starting weights
(bench.train_minilm --calibrated --start file: the student starts from a calibrated file's repaired values, the
teacher is the original model)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from codec.train import NotKeptWarning, coded_weights, finetune

SETTING = "b6"


def _tiny():
    torch.manual_seed(2)  # 0.weight 48x64 is coded; 2.weight 10x48 and the biases are stored losslessly
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))


def _inputs(n: int = 8):
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(32, 64, generator=generator) for _ in range(n)]


def _away(model):
    """A copy of ``model`` with every weight moved: a student that does not start at the teacher."""
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.6).add_(0.05)
    return student


def _gap(student, teacher, batches) -> float:
    """Mean squared error of the student as the file decodes it against the teacher's outputs."""
    coded = coded_weights(student, SETTING)
    with torch.no_grad():
        return sum(torch.nn.functional.mse_loss(torch.func.functional_call(student, coded, (x,)), teacher(x)).item()
                   for x in batches) / len(batches)


def test_the_student_moves_to_the_teacher_not_to_its_start():
    teacher, batches = _tiny(), _inputs()
    kept = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()
    student = _away(teacher)
    before = _gap(student, teacher, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotKeptWarning)  # the check measures against the teacher: kept
        finetune(student, batches, None, setting=SETTING, steps=60, lr=1e-2, teacher=teacher)
    after = _gap(student, teacher, batches)
    assert after < 0.5 * before, (before, after)
    assert teacher.training  # its mode restored, its weights untouched
    assert all(torch.equal(kept[k], v) for k, v in teacher.state_dict().items())

    alone = _away(teacher)  # without a teacher it distils its own start: no nearer to the original
    finetune(alone, batches, None, setting=SETTING, steps=60, lr=1e-2, validation=False)
    assert _gap(alone, teacher, batches) > 0.8 * before


def test_a_wrong_teacher_is_refused_by_name():
    model = _tiny()
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module or None, not dict"):
        finetune(model, _inputs(2), None, setting=SETTING, steps=1, teacher=dict(model.state_dict()))
    with pytest.raises(ValueError, match="teacher is the model distilled when loss_fn is None"):
        finetune(model, [(x, x[:, :10]) for x in _inputs(2)], torch.nn.functional.mse_loss, setting=SETTING,
                 steps=1, teacher=_tiny())
    with pytest.raises(ValueError, match="teacher must not be the model being fine-tuned"):
        finetune(model, _inputs(2), None, setting=SETTING, steps=1, teacher=model)



class _Interrupted(Exception):
    """What a Ctrl-C in the middle of the loop stands for."""


def test_both_modes_are_the_callers_again_when_the_loop_is_interrupted():
    teacher = _tiny()
    student = _away(teacher)
    student.train(), teacher.train()  # the caller's modes; distillation runs both in eval mode
    seen = []

    def stop(module, args):
        seen.append((student.training, teacher.training))
        if len(seen) == 5:
            raise _Interrupted

    student.register_forward_pre_hook(stop)
    with pytest.raises(_Interrupted):
        finetune(student, _inputs(4), None, setting=SETTING, steps=20, teacher=teacher, validation=False)
    assert seen[-1] == (False, False)  # it was stopped inside the loop, in the loop's modes
    assert student.training and teacher.training
