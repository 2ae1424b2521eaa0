"""MultiheadAttention over time: nn.MultiheadAttention on the folded [T, B*N, C] tensor, checked
against torch.nn per position, with masks, gradients, errors, TorchScript, compile, export, C++."""

import inspect
import warnings

import pytest
import torch
import torch.nn as nn

import matterhorn_pytorch as mth
from conftest import run_model_in_cpp

MultiheadAttention = mth.snn.MultiheadAttention

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# constructor variants: (id, kwargs); embed_dim 8, 2 heads unless given
CONFIGS = [
    ("default", dict()),
    ("no-bias", dict(bias=False)),
    ("bias-kv-zero-attn", dict(add_bias_kv=True, add_zero_attn=True)),
    ("kdim-vdim", dict(kdim=5, vdim=3)),
    ("batch-first", dict(batch_first=True)),
    ("batch-first-kdim-vdim", dict(batch_first=True, kdim=5, vdim=3, num_heads=4)),
]
# (config, self-attention): a key of kdim features cannot be the query
CASES = [(config, attend) for config in CONFIGS for attend in (True, False) if not (attend and "kdim" in config[1])]
CASE_IDS = [f"{config[0]}-{'self' if attend else 'cross'}" for config, attend in CASES]


def layers(kwargs, dtype=torch.float64):
    """Ours and torch.nn's with the same parameters."""
    kwargs = dict(kwargs)
    heads = kwargs.pop("num_heads", 2)
    ours = MultiheadAttention(8, heads, **kwargs, dtype=dtype)
    reference = nn.MultiheadAttention(8, heads, **kwargs, dtype=dtype)
    with torch.no_grad():  # parameters away from torch's zero biases
        for p in ours.parameters():
            p.uniform_(-0.5, 0.5)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def inputs(layer, T, S, batch, self_attention, dtype=torch.float64):
    """query [T, B, ..., E] (or [B, T, ...]), key and value with S steps; leaves requiring grad."""
    def sequence(steps, features):
        shape = [batch[0], steps, *batch[1:], features] if layer.batch_first else [steps, *batch, features]
        return torch.randn(shape, dtype=dtype, requires_grad=True)
    query = sequence(T, layer.embed_dim)
    if self_attention:
        return query, query, query
    return query, sequence(S, layer.kdim), sequence(S, layer.vdim)


def per_position(reference, query, key, value, batch_first, key_padding_mask=None, attn_mask=None, **kwargs):
    """torch.nn over one extra position at a time: query [T, B, N, E] (or [B, T, N, E]); masks in
    our terms: key_padding_mask [B, N, S] or [B, S], attn_mask [T, S] or [B, N, heads, T, S]."""
    outputs, weights = [], []
    for n in range(query.shape[2]):
        padding = key_padding_mask
        if padding is not None and padding.dim() == 3:
            padding = padding[:, n]
        mask = attn_mask
        if mask is not None and mask.dim() == 5:
            mask = mask[:, n].flatten(0, 1)
        output, weight = reference(query[:, :, n], key[:, :, n], value[:, :, n], key_padding_mask=padding,
                                   attn_mask=mask, **kwargs)
        outputs.append(output)
        weights.append(weight)
    return torch.stack(outputs, 2), (None if weights[0] is None else torch.stack(weights, 1))


def assert_gradients_equal(tensors, references):
    for ours, reference in zip(tensors, references):
        torch.testing.assert_close(ours.grad, reference.grad)


@pytest.mark.parametrize("config,self_attention", CASES, ids=CASE_IDS)
def test_time_batch_input_equals_torch_nn_with_gradients(config, self_attention):
    # [T, B, E]: the fold is no fold; same arithmetic as torch.nn, so float32 and the default tolerance
    ours, reference = layers(config[1], dtype=torch.float32)
    query, key, value = inputs(ours, 5, 5 if self_attention else 4, [3], self_attention, dtype=torch.float32)
    output, weights = ours(query, key, value)
    expected, expected_weights = reference(query, key, value)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(weights, expected_weights)
    grad = torch.randn_like(output)
    ours_grads = torch.autograd.grad(output, [query, key, value, *ours.parameters()], grad, allow_unused=True)
    reference_grads = torch.autograd.grad(expected, [query, key, value, *reference.parameters()], grad,
                                          allow_unused=True)
    for g, r in zip(ours_grads, reference_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("config,self_attention", CASES, ids=CASE_IDS)
def test_extra_positions_attend_separately_with_gradients(config, self_attention):
    # [T, B, N, E]: torch.nn per position n, stacked; float64, so the one folded call and the N
    # separate calls agree to rounding
    ours, reference = layers(config[1])
    query, key, value = inputs(ours, 4, 4 if self_attention else 6, [2, 3], self_attention)
    output, weights = ours(query, key, value)
    expected, expected_weights = per_position(reference, query, key, value, ours.batch_first)
    assert output.shape == query.shape[:-1] + (8,) and weights.shape[:3] == (2, 3, 4)  # [B, N, T, S]
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(weights, expected_weights)
    grad = torch.randn_like(output)
    ours_grads = torch.autograd.grad(output, [query, key, value, *ours.parameters()], grad, allow_unused=True)
    reference_grads = torch.autograd.grad(expected, [query, key, value, *reference.parameters()], grad,
                                          allow_unused=True)
    for g, r in zip(ours_grads, reference_grads):
        torch.testing.assert_close(g, r)


def test_two_extra_dimensions_fold_in_order():
    ours, reference = layers(dict())
    x = torch.randn(3, 2, 2, 3, 8, dtype=torch.float64)
    output, weights = ours(x, x, x, average_attn_weights=False)
    for i in range(2):
        expected, expected_weights = per_position(reference, x[:, :, i], x[:, :, i], x[:, :, i], False,
                                                  average_attn_weights=False)
        torch.testing.assert_close(output[:, :, i], expected)
        torch.testing.assert_close(weights[:, i], expected_weights)
    assert weights.shape == (2, 2, 3, 2, 3, 3)  # [B, N, M, heads, T, S]


def causal(T, S, dtype):
    mask = torch.ones(T, S, dtype=torch.bool).triu(1)
    return mask if dtype == torch.bool else torch.zeros(T, S, dtype=dtype).masked_fill(mask, float("-inf"))


def padding_mask(shape, dtype):
    mask = torch.rand(shape) < 0.3
    mask[..., 0] = False  # a sequence never loses every key
    return mask if dtype == torch.bool else torch.zeros(shape, dtype=dtype).masked_fill(mask, float("-inf"))


MASK_CASES = ["padding-per-position", "padding-broadcast", "attn-2d", "attn-per-head", "attn-and-padding", "causal"]


@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)],
                         ids=["weights", "per-head-weights", "no-weights"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float64], ids=["bool", "float"])
@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("batch_first", [False, True], ids=["time-first", "batch-first"])
def test_masks_in_the_inputs_terms(case, mask_dtype, need_weights, average, batch_first):
    ours, reference = layers(dict(batch_first=batch_first))
    T, B, N, heads = 5, 2, 3, 2
    query, key, value = inputs(ours, T, T, [B, N], True)
    masks = {}
    if case.startswith("padding") or case == "attn-and-padding":
        masks["key_padding_mask"] = padding_mask((B, T) if case == "padding-broadcast" else (B, N, T), mask_dtype)
    if case == "attn-2d" or case == "attn-and-padding":
        masks["attn_mask"] = padding_mask((T, T), mask_dtype)
    if case == "attn-per-head":
        masks["attn_mask"] = padding_mask((B, N, heads, T, T), mask_dtype)
    if case == "causal":
        masks["attn_mask"], masks["is_causal"] = causal(T, T, mask_dtype), True
    options = dict(need_weights=need_weights, average_attn_weights=average)
    output, weights = ours(query, key, value, **masks, **options)
    expected, expected_weights = per_position(reference, query, key, value, batch_first, **masks, **options)
    torch.testing.assert_close(output, expected)
    if need_weights:
        assert weights.shape == (B, N, T, T) if average else (B, N, heads, T, T)
        torch.testing.assert_close(weights, expected_weights)
    else:
        assert weights is None
    grad = torch.randn_like(output)
    torch.testing.assert_close(torch.autograd.grad(output, query, grad)[0],
                               torch.autograd.grad(expected, query, grad)[0])


def test_attn_mask_in_torch_nn_folded_form_and_per_head_form_agree():
    ours, reference = layers(dict())
    x = torch.randn(4, 2, 3, 8, dtype=torch.float64)
    per_head = padding_mask((2, 3, 2, 4, 4), torch.bool)
    folded_batch = per_head.flatten(0, 2)  # torch.nn's [B*N*heads, T, S], batch row b*N + n
    torch.testing.assert_close(ours(x, x, x, attn_mask=folded_batch)[0], ours(x, x, x, attn_mask=per_head)[0])
    torch.testing.assert_close(ours(x, x, x, attn_mask=folded_batch)[0],
                               per_position(reference, x, x, x, False, attn_mask=per_head)[0])


def test_unbatched_time_sequence_is_torch_nn_unbatched():
    ours, reference = layers(dict())
    x = torch.randn(5, 8, dtype=torch.float64)
    mask = padding_mask((5,), torch.bool)
    for got, expected in zip(ours(x, x, x, key_padding_mask=mask), reference(x, x, x, key_padding_mask=mask)):
        torch.testing.assert_close(got, expected)


def test_dropout_in_training_is_torch_nns_on_the_folded_tensor():
    ours, reference = layers(dict(dropout=0.5))
    x = torch.randn(4, 2, 3, 8, dtype=torch.float64)
    torch.manual_seed(1)
    output, weights = ours(x, x, x)
    torch.manual_seed(1)
    folded = x.flatten(1, 2)
    expected, expected_weights = reference(folded, folded, folded)
    torch.testing.assert_close(output, expected.unflatten(1, (2, 3)))
    torch.testing.assert_close(weights, expected_weights.unflatten(0, (2, 3)))
    ours.eval(), reference.eval()  # no dropout in eval
    torch.testing.assert_close(ours(x, x, x)[0], per_position(reference, x, x, x, False)[0])


def test_gradcheck_float64():
    ours = MultiheadAttention(4, 2, kdim=3, add_bias_kv=True, dtype=torch.float64)
    query = torch.randn(3, 1, 2, 4, dtype=torch.float64, requires_grad=True)
    key = torch.randn(2, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 1, 2, 4, dtype=torch.float64, requires_grad=True)
    mask = padding_mask((1, 2, 2), torch.bool)
    assert torch.autograd.gradcheck(lambda q, k, v: ours(q, k, v, key_padding_mask=mask)[0], (query, key, value))


@pytest.mark.parametrize("kwargs", [dict(), dict(bias=False), dict(add_bias_kv=True), dict(kdim=5, vdim=3)],
                         ids=["default", "no-bias", "bias-kv", "kdim-vdim"])
def test_state_dict_keys_and_signature_are_torch_nns(kwargs):
    ours, theirs = MultiheadAttention(8, 2, **kwargs), nn.MultiheadAttention(8, 2, **kwargs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())  # a torch.nn checkpoint loads
    assert isinstance(ours, nn.MultiheadAttention) and isinstance(ours, mth.snn.Module)
    parameters = list(inspect.signature(MultiheadAttention.__init__).parameters.values())[1:]
    torch_parameters = list(inspect.signature(nn.MultiheadAttention.__init__).parameters.values())[1:]
    assert [(p.name, p.default) for p in parameters[:len(torch_parameters)]] == [
        (p.name, p.default) for p in torch_parameters]
    assert [(p.name, p.kind) for p in parameters[len(torch_parameters):]] == [
        ("multi_time_step", inspect.Parameter.KEYWORD_ONLY)]


def test_single_step_mode_is_an_error_naming_the_layer():
    layer = MultiheadAttention(8, 2)
    x = torch.randn(4, 3, 8)
    model = nn.Sequential(mth.snn.Linear(8, 8), layer)
    mth.snn.Module.single_step_mode_(layer)
    with pytest.raises(ValueError, match=r"^MultiheadAttention: attention is over time .* no single-step mode"):
        layer(x, x, x)
    with pytest.raises(ValueError, match="no single-step mode"):
        MultiheadAttention(8, 2, multi_time_step=False)(x, x, x)
    layer.multi_step_mode_()
    assert layer(model[0](x), x, x)[0].shape == (4, 3, 8)


NAME = r"^MultiheadAttention\(embed_dim=8, num_heads=2\): "


@pytest.mark.parametrize("case", [
    ("query features", lambda x: ((torch.randn(4, 3, 7),) * 3, {}), ValueError,
     NAME + r"expected the query \[T, B, \.\.\., 8\] \(or \[T, 8\]\); got \[4, 3, 7\]"),
    ("1-D query", lambda x: ((torch.randn(8),) * 3, {}), ValueError, NAME + r"expected the query .* got \[8\]"),
    ("key rank", lambda x: ((x, x[:, :, 0], x), {}), ValueError,
     NAME + r"the key \[4, 2, 8\] must have the query's rank"),
    ("key batch", lambda x: ((x, x[:, :1], x[:, :1]), {}), ValueError,
     NAME + r"the key \[4, 1, 3, 8\] must have the query's batch and extra sizes"),
    ("key and value steps", lambda x: ((x, x, x[:3]), {}), ValueError,
     NAME + r"key \[4, 2, 3, 8\] and value \[3, 2, 3, 8\] must have the same sizes but the last"),
    ("padding shape", lambda x: ((x, x, x), dict(key_padding_mask=torch.zeros(2, 3, 5, dtype=torch.bool))),
     ValueError, NAME + r"expected key_padding_mask \[2, 3, 4\] \(\[B, \.\.\., S\]\) or \[2, 4\] \(\[B, S\]\); "
                        r"got \[2, 3, 5\]"),
    ("attn_mask shape", lambda x: ((x, x, x), dict(attn_mask=torch.zeros(2, 4, 4))), ValueError,
     NAME + r"expected attn_mask \[4, 4\] \(\[T, S\]\), \[2, 3, 2, 4, 4\] \(\[B, \.\.\., heads, T, S\]\) or "
            r"\[12, 4, 4\]"),
    ("integer mask", lambda x: ((x, x, x), dict(attn_mask=torch.zeros(4, 4, dtype=torch.int64))), TypeError,
     r"^MultiheadAttention: attn_mask must be bool or floating point, got torch.int64"),
    ("dtype", lambda x: ((x.double(),) * 3, {}), TypeError,
     r"^MultiheadAttention: the query's dtype torch.float64 does not match the layer's weight dtype torch.float32"),
    ("device", lambda x: ((x.to("meta"),) * 3, {}), ValueError,
     r"^MultiheadAttention: the query is on meta but the layer's weight is on cpu; move one of them"),
], ids=lambda c: c[0])
def test_bad_inputs_raise_naming_the_layer(case):
    _, make, error, message = case
    arguments, keywords = make(torch.randn(4, 2, 3, 8))
    with pytest.raises(error, match=message):
        MultiheadAttention(8, 2)(*arguments, **keywords)


@pytest.mark.parametrize("args,message", [
    ((8, 3), r"embed_dim \(8\) must be divisible by num_heads \(3\)"),
    ((8, 0), r"num_heads must be a positive integer, got 0"),
    ((0, 1), r"embed_dim must be a positive integer, got 0"),
    ((8, 2, 1.5), r"dropout must be a probability in \[0, 1\], got 1.5"),
    ((8, 2, 0.0, True, False, False, -1), r"kdim must be a positive integer, got -1"),
])
def test_bad_constructor_arguments_raise_naming_the_layer(args, message):
    with pytest.raises(ValueError, match=r"^MultiheadAttention: " + message):
        MultiheadAttention(*args)


class SelfAttention(nn.Module):
    """One tensor in, one out: the shape TorchScript files run from C++ take."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.attention = MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.shape[1 if self.attention.batch_first else 0]
        mask = torch.ones(steps, steps, dtype=torch.bool, device=x.device).triu(1)
        output, weights = self.attention(x, x, x, attn_mask=mask)
        assert weights is not None
        return output + weights.mean()


@pytest.mark.parametrize("batch_first", [False, True], ids=["time-first", "batch-first"])
@pytest.mark.parametrize("export", ["script", "trace"])
def test_torchscript_round_trip_and_cpp_program(export, batch_first, tmp_path):
    model = SelfAttention(batch_first).eval()
    x = torch.randn(4, 3, 2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.jit.script(model) if export == "script" else torch.jit.trace(model, x)
    path = tmp_path / "attention.pt"
    exported.save(str(path))
    loaded = torch.jit.load(str(path))
    shapes = [(4, 3, 2, 8), (3, 5, 4, 8)] + ([(2, 3, 8)] if export == "script" else [])  # a trace keeps the rank
    for shape in shapes:  # other T, B and N (and rank, scripted) through the same file
        x = torch.randn(shape)
        torch.testing.assert_close(loaded(x), model(x))
        torch.testing.assert_close(run_model_in_cpp(path, x, tmp_path), model(x), rtol=1e-5, atol=1e-5)


class CrossAttention(nn.Module):
    """Query and memory of other lengths, a padding mask in the input's terms; output and weights."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.attention = MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=batch_first, dtype=torch.float64)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor):
        output, weights = self.attention(query, memory, memory, key_padding_mask=padding)
        return output, weights


def cross_inputs(T, S, B, batch_first=False):
    query = torch.randn((B, T, 3, 8) if batch_first else (T, B, 3, 8), dtype=torch.float64)
    memory = torch.randn((B, S, 3, 6) if batch_first else (S, B, 3, 6), dtype=torch.float64)
    return query, memory, padding_mask((B, S), torch.bool)


def test_compile_fullgraph_matches_eager_forward_and_backward():
    # float64: inductor's reordered sums stay within the default float64 tolerance; batch_first is
    # the same code with transposes (the export test runs it)
    batch_first = False
    eager = CrossAttention(batch_first)
    compiled_model = CrossAttention(batch_first)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)  # a graph break is an error
    time = 1 if batch_first else 0
    try:
        for call, (T, S, B) in enumerate([(4, 5, 2), (3, 6, 3)]):  # two T, S, B: one graph with symbolic sizes
            query, memory, padding = cross_inputs(T, S, B, batch_first)
            for x in (memory, padding):  # sizes the layer equates with the query's: may be
                torch._dynamo.maybe_mark_dynamic(x, 0), torch._dynamo.maybe_mark_dynamic(x, 1)
            if call == 1:
                torch.compiler.set_stance("fail_on_recompile")
            grads = []
            for model in (eager, compiled):
                q = query.clone().requires_grad_()
                torch._dynamo.mark_dynamic(q, 0), torch._dynamo.mark_dynamic(q, 1)
                output, weights = model(q, memory, padding)
                (output.square().sum() + weights.square().sum()).backward()
                grads.append((output, weights, q.grad))
            for got, expected in zip(grads[1], grads[0]):
                torch.testing.assert_close(got, expected)
            for p_compiled, p_eager in zip(compiled_model.parameters(), eager.parameters()):
                torch.testing.assert_close(p_compiled.grad, p_eager.grad)
            eager.zero_grad(), compiled_model.zero_grad()
            assert output.shape[time] == T
    finally:
        torch.compiler.set_stance("default")


@pytest.mark.parametrize("need_weights,batch_first", [(False, False), (True, True)],
                         ids=["no-weights-time-first", "weights-batch-first"])
def test_export_with_dynamic_time_and_batch_runs_atens_attention(need_weights, batch_first):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = MultiheadAttention(8, 2, batch_first=batch_first, dtype=torch.float64)

        def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
            output, weights = self.attention(x, x, x, key_padding_mask=padding, need_weights=need_weights)
            return output if weights is None else output + weights.sum(-1, keepdim=True).mean()

    model = Model().eval()
    T, B = torch.export.Dim("T", min=2), torch.export.Dim("B", min=2)

    def steps(T_, B_):
        return torch.randn((B_, T_, 2, 8) if batch_first else (T_, B_, 2, 8), dtype=torch.float64)

    exported = torch.export.export(model, (steps(4, 3), padding_mask((3, 4), torch.bool)),
                                   dynamic_shapes=({1: T, 0: B} if batch_first else {0: T, 1: B}, {0: B, 1: T}))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    # no weights: scaled dot-product attention; weights: torch's own explicit softmax path
    assert ("aten.scaled_dot_product_attention.default" in targets) != need_weights, targets
    for T_, B_ in [(4, 3), (7, 2)]:
        x, padding = steps(T_, B_), padding_mask((B_, T_), torch.bool)
        torch.testing.assert_close(exported.module()(x, padding), model(x, padding))


def cpp_twin(python_layer, **kwargs):
    from torch.utils.dlpack import to_dlpack  # noqa: PLC0415
    cpp_layer = mth._C.MultiheadAttention(python_layer.embed_dim, python_layer.num_heads, **kwargs)
    cpp_layer.load_parameters({name: to_dlpack(p.detach()) for name, p in python_layer.named_parameters()})
    return cpp_layer


def cpp_forward(cpp_layer, query, key=None, value=None, **kwargs):
    """The C++ module's forward on dlpack capsules; key/value None: the query (self-attention)."""
    from torch.utils.dlpack import from_dlpack, to_dlpack  # noqa: PLC0415
    capsule = lambda t: None if t is None else to_dlpack(t.detach())  # noqa: E731
    kwargs = {k: capsule(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    output, weights = cpp_layer.forward(capsule(query), capsule(key), capsule(value), **kwargs)
    return from_dlpack(output), None if weights is None else from_dlpack(weights)


CPP_CASES = [
    ("default-self", dict(), True, {}),
    ("no-bias-cross", dict(bias=False), False, {}),
    ("bias-kv-zero-attn-padding", dict(add_bias_kv=True, add_zero_attn=True), False,
     dict(key_padding_mask=lambda B, N, T, S: padding_mask((B, S), torch.bool))),
    ("kdim-vdim-per-head-mask", dict(kdim=5, vdim=3), False,
     dict(attn_mask=lambda B, N, T, S: padding_mask((B, N, 2, T, S), torch.float32), average_attn_weights=False)),
    ("batch-first-causal-no-weights", dict(batch_first=True), True,
     dict(attn_mask=lambda B, N, T, S: causal(T, S, torch.bool), is_causal=True, need_weights=False)),
    ("padding-and-mask-no-weights", dict(), True,
     dict(key_padding_mask=lambda B, N, T, S: padding_mask((B, N, S), torch.bool),
          attn_mask=lambda B, N, T, S: padding_mask((T, S), torch.bool), need_weights=False)),
]


@pytest.mark.parametrize("case", CPP_CASES, ids=lambda c: c[0])
def test_cpp_module_gives_the_python_classs_numbers(case):
    _, kwargs, self_attention, options = case
    python_layer = MultiheadAttention(8, 2, **kwargs)
    with torch.no_grad():
        for p in python_layer.parameters():
            p.uniform_(-0.5, 0.5)
    cpp_layer = cpp_twin(python_layer, **kwargs)
    assert set(cpp_layer.named_parameters()) == {name for name, _ in python_layer.named_parameters()}
    B, N, T = 2, 3, 4
    S = T if self_attention else 5
    query, key, value = inputs(python_layer, T, S, [B, N], self_attention, dtype=torch.float32)
    options = {k: v(B, N, T, S) if callable(v) else v for k, v in options.items()}
    with torch.no_grad():
        expected, expected_weights = python_layer(query, key, value, **options)
        output, weights = cpp_forward(cpp_layer, query, None if self_attention else key,
                                      None if self_attention else value, **options)
    # the same ATen calls in the same order: equal to float32 rounding
    torch.testing.assert_close(output, expected)
    if expected_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, expected_weights)


def test_cpp_module_initialisation_repr_and_errors():
    from torch.utils.dlpack import from_dlpack  # noqa: PLC0415
    cpp_layer = mth._C.MultiheadAttention(16, 4)
    parameters = {name: from_dlpack(p) for name, p in cpp_layer.named_parameters().items()}
    bound = (6 / (16 + 48)) ** 0.5  # xavier_uniform of [3E, E], as torch.nn
    assert parameters["in_proj_weight"].shape == (48, 16)
    assert 0.9 * bound < parameters["in_proj_weight"].abs().max() <= bound
    assert not parameters["in_proj_bias"].any() and not parameters["out_proj.bias"].any()
    assert repr(mth._C.MultiheadAttention(8, 2, kdim=5, batch_first=True)) == (
        "matterhorn::snn::MultiheadAttention(embed_dim=8, num_heads=2, dropout=0, bias=true, add_bias_kv=false, "
        "add_zero_attn=false, kdim=5, vdim=8, batch_first=true)")
    with pytest.raises(ValueError, match=r"^MultiheadAttention: embed_dim \(8\) must be divisible by num_heads \(3\)"):
        mth._C.MultiheadAttention(8, 3)
    layer = mth._C.MultiheadAttention(8, 2)
    x = torch.randn(4, 2, 3, 8)
    with pytest.raises(ValueError, match=NAME + r"expected the query \[T, B, \.\.\., 8\] \(or \[T, 8\]\); "
                                                r"got \[4, 3, 7\]"):
        cpp_forward(layer, torch.randn(4, 3, 7))
    with pytest.raises(ValueError, match=NAME + r"expected key_padding_mask \[2, 3, 4\] \(\[B, \.\.\., S\]\) or "
                                                r"\[2, 4\] \(\[B, S\]\); got \[2, 3, 5\]"):
        cpp_forward(layer, x, key_padding_mask=torch.zeros(2, 3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"^MultiheadAttention: the query's dtype torch.float64 does not match"):
        cpp_forward(layer, x.double())
    with pytest.raises(ValueError, match=r"^MultiheadAttention: is_causal says that attn_mask is the causal mask"):
        cpp_forward(layer, x, is_causal=True)


@pytest.mark.parametrize("shape", [(0, 2, 3, 8), (3, 0, 3, 8), (3, 2, 0, 8)], ids=["T=0", "B=0", "N=0"])
def test_empty_time_batch_or_positions_are_torch_nns_empty_results(shape):
    ours, reference = layers(dict())
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    folded = x.flatten(1, 2)
    for need_weights in (True, False):
        output, weights = ours(x, x, x, need_weights=need_weights)
        expected, expected_weights = reference(folded, folded, folded, need_weights=need_weights)
        torch.testing.assert_close(output, expected.unflatten(1, shape[1:3]))
        if need_weights:
            torch.testing.assert_close(weights, expected_weights.unflatten(0, shape[1:3]))
        output.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_autocast_computes_as_torch_nn_does(input_dtype):
    ours, reference = layers(dict(), dtype=torch.float32)
    x = torch.randn(3, 2, 4, 8).to(input_dtype)
    folded = x.flatten(1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, weights = ours(x, x, x)
        expected, expected_weights = reference(folded, folded, folded)
    assert output.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(output, expected.unflatten(1, (2, 4)))
    torch.testing.assert_close(weights, expected_weights.unflatten(0, (2, 4)))
