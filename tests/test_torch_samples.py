"""Every input form torch.nn accepts: the sample inputs torch's own module tests define for each
twin (torch.testing._internal.common_modules.module_db) go through our layer in single-step mode
and give the twin's outputs, gradients and running statistics."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.testing._internal.common_modules import module_db

import matterhorn_pytorch as mth

TWINS = {info.module_cls.__name__: info for info in module_db
         if info.module_cls.__module__.startswith("torch.nn.modules")
         and isinstance(getattr(mth.snn, info.module_cls.__name__, None), type)
         and issubclass(getattr(mth.snn, info.module_cls.__name__), mth.snn.Synapse)}


def samples():
    for name, info in sorted(TWINS.items()):
        for training in (True, False):
            # the samples are made on the fly; building them once per id keeps parametrisation cheap
            for index, _ in enumerate(info.module_inputs_func(info, device="cpu", dtype=torch.float64,
                                                              requires_grad=True, training=training)):
                yield pytest.param(name, training, index, id=f"{name}-{'train' if training else 'eval'}-{index}")


def detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return copy.deepcopy(value)


def grads(outputs, inputs):
    outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if isinstance(o, torch.Tensor)]
    torch.manual_seed(1)
    cotangents = [torch.randn_like(o) for o in outputs]
    differentiable = [t for t in inputs if t.requires_grad]
    if not any(o.requires_grad for o in outputs):
        return []
    return torch.autograd.grad(outputs, differentiable, cotangents, allow_unused=True)


def test_every_synapse_with_a_torch_twin_is_covered():
    assert {"Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
            "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm"} <= set(TWINS)


@pytest.mark.parametrize("name,training,index", list(samples()))
def test_torch_sample_gives_the_twins_result(name, training, index):
    info = TWINS[name]
    sample = info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                     training=training)[index]
    constructor = sample.constructor_input
    torch.manual_seed(0)
    twin = info.module_cls(*constructor.args, **constructor.kwargs).double().train(training)
    ours = getattr(mth.snn, name)(*constructor.args, **constructor.kwargs, multi_time_step=False)
    ours = ours.double().train(training)
    ours.load_state_dict(twin.state_dict())
    twin_args = [detached(a) for a in sample.forward_input.args]
    twin_kwargs = {k: detached(v) for k, v in sample.forward_input.kwargs.items()}
    our_args = [detached(a) for a in twin_args]
    our_kwargs = {k: detached(v) for k, v in twin_kwargs.items()}

    expected = twin(*twin_args, **twin_kwargs)
    actual = ours(*our_args, **our_kwargs)
    torch.testing.assert_close(actual, expected)

    tensors = lambda args, kwargs, module: [t for t in [*args, *kwargs.values(), *module.parameters()]
                                             if isinstance(t, torch.Tensor)]
    for ours_grad, twin_grad in zip(grads(actual, tensors(our_args, our_kwargs, ours)),
                                    grads(expected, tensors(twin_args, twin_kwargs, twin))):
        torch.testing.assert_close(ours_grad, twin_grad)
    for (key, ours_state), (_, twin_state) in zip(ours.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(ours_state, twin_state, msg=key)
