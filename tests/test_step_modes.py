"""Time-step modes of snn.Module and the Synapse contract (forward_step / forward_steps)."""

import pytest
import torch
import torch.nn as nn

import matterhorn_pytorch as mth


def test_default_is_multi_step_and_shows_in_repr():
    layer = mth.snn.Linear(3, 2)
    assert layer.multi_step_mode and not layer.single_step_mode
    assert "step_mode='m'" in repr(layer)


def test_multi_time_step_keyword():
    assert mth.snn.Linear(3, 2, multi_time_step=False).single_step_mode
    assert mth.snn.Linear(3, 2, multi_time_step=True).multi_step_mode
    assert mth.snn.Linear(3, 2, multi_time_step=None).multi_step_mode
    with pytest.raises(TypeError, match="multi_time_step"):
        mth.snn.Linear(3, 2, multi_time_step="yes")


def test_mode_switches_return_the_module_and_recurse():
    outer = mth.snn.Module()
    outer.inner = nn.Sequential(mth.snn.Linear(3, 2), nn.ReLU(), mth.snn.Linear(2, 2))
    assert outer.single_step_mode_() is outer
    assert all(m.single_step_mode for m in outer.modules() if isinstance(m, mth.snn.Module))
    assert outer.multi_step_mode_(recursive=False) is outer
    assert outer.multi_step_mode and outer.inner[0].single_step_mode
    outer.multi_step_mode_()
    assert outer.inner[2].multi_step_mode
    assert outer.multi_step_mode_(if_on=False) is outer and outer.inner[0].single_step_mode
    assert outer.single_step_mode_(if_on=False) is outer and outer.inner[2].multi_step_mode
    assert "step_mode='s'" in repr(mth.snn.Linear(3, 2).single_step_mode_())


def test_a_multi_step_only_layer_below_refuses_single_step_before_any_layer_switches():
    outer = mth.snn.Module()
    outer.body = nn.Sequential(mth.snn.Linear(3, 3), mth.snn.BatchNormThroughTime1d(2, 3))
    with pytest.raises(ValueError, match=r"^BatchNormThroughTime1d \(at 'body.1' in Module\): a multi-step layer "
                                         r"\(it normalizes over time\); single-step mode is not supported"):
        outer.single_step_mode_()
    assert all(m.multi_step_mode for m in outer.modules() if isinstance(m, mth.snn.Module))
    outer.single_step_mode_(recursive=False)  # the parent alone has a single-step mode
    assert outer.single_step_mode and outer.body[1].multi_step_mode
    with pytest.raises(ValueError, match=r"^TemporalEffectiveBatchNorm2d: a multi-step layer"):
        mth.snn.TemporalEffectiveBatchNorm2d(2, 3).multi_step_mode_(False)


def test_reset_and_detach_return_the_module():
    layer = mth.snn.Linear(3, 2)
    assert layer.reset() is layer
    assert layer.detach() is layer


def test_linear_equals_torch_in_both_modes_and_with_batch_first():
    layer = mth.snn.Linear(5, 4)
    reference = nn.Linear(5, 4)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 2, 5)
    expected = reference(x.flatten(0, 1)).unflatten(0, (3, 2))  # torch.nn on the folded tensor
    torch.testing.assert_close(layer(x), expected)
    steps = torch.stack([layer.single_step_mode_()(x[t]) for t in range(3)])
    torch.testing.assert_close(steps, expected)
    batch_first = mth.snn.Linear(5, 4, batch_first=True)
    batch_first.load_state_dict(layer.state_dict())
    assert "batch_first=True" in repr(batch_first)
    torch.testing.assert_close(batch_first(x.transpose(0, 1)), expected.transpose(0, 1))


class CountingScale(mth.snn.Synapse):
    """A time-independent synapse: only forward_step is defined."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0
        self.shapes = []

    def forward_step(self, o):
        self.calls += 1
        self.shapes.append(tuple(o.shape))
        return o * 2.0 + 1.0


def test_forward_step_override_runs_multi_step_as_one_folded_call():
    synapse = CountingScale()
    x = torch.randn(6, 4, 3)
    y = synapse(x)
    assert synapse.calls == 1 and synapse.shapes == [(24, 3)]
    torch.testing.assert_close(y, x * 2.0 + 1.0)
    assert y.shape == (6, 4, 3)


def test_forward_step_override_with_batch_first_sees_folded_time_major_rows():
    synapse = CountingScale(batch_first=True)
    x = torch.randn(4, 6, 3)  # [B, T, ...]
    y = synapse(x)
    assert synapse.calls == 1 and y.shape == (4, 6, 3)
    torch.testing.assert_close(y, x * 2.0 + 1.0)


def test_single_step_mode_calls_forward_step_directly():
    synapse = CountingScale(multi_time_step=False)
    x = torch.randn(4, 3)
    torch.testing.assert_close(synapse(x), x * 2.0 + 1.0)
    assert synapse.shapes == [(4, 3)]


class RunningSum(mth.snn.Synapse):
    """A time-dependent synapse: output at t is the sum of inputs up to t."""

    def forward_steps(self, o):
        return torch.cumsum(o, dim=0)


def test_forward_steps_override_gets_its_time_dependent_behaviour():
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(RunningSum()(x), torch.cumsum(x, 0))
    # batch_first input is handed to forward_steps as [T, B, ...] and returned as [B, T, ...].
    torch.testing.assert_close(RunningSum(batch_first=True)(x.transpose(0, 1)), torch.cumsum(x, 0).transpose(0, 1))


def test_base_synapse_without_overrides_raises():
    with pytest.raises(NotImplementedError):
        mth.snn.Synapse()(torch.randn(2, 3, 4))


def test_multi_step_input_of_rank_one_is_rejected():
    with pytest.raises(ValueError, match=r"\[T, B, \.\.\.\]"):
        CountingScale()(torch.randn(5))
