#include "matterhorn/snn/attention.h"

#include <cmath>
#include <limits>
#include <vector>

#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/dropout.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/nn/init.h>

#include "ops/checks.h"

namespace matterhorn::snn {
namespace {

using ops::detail::dtype_name;
using ops::detail::dtype_remedy;

// "MultiheadAttention(embed_dim=8, num_heads=2)" in messages, built only when a check fails.
struct Described {
  const MultiheadAttentionOptions& options;
};

std::ostream& operator<<(std::ostream& out, const Described& layer) {
  return out << "MultiheadAttention(embed_dim=" << layer.options.embed_dim()
             << ", num_heads=" << layer.options.num_heads() << ")";
}

// The sizes of x but dimension `skip` and the last: the batch and extra sizes of a sequence.
std::vector<int64_t> sequence_sizes(const at::Tensor& x, int64_t skip) {
  std::vector<int64_t> sizes;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    if (d != skip) sizes.push_back(x.size(d));
  }
  return sizes;
}

// torch.nn reads a bool mask (true: masked) as an additive one with -inf there.
at::Tensor additive(const at::Tensor& mask, at::ScalarType dtype) {
  if (!mask.defined() || mask.is_floating_point()) return mask;
  return at::zeros(mask.sizes(), mask.options().dtype(dtype))
      .masked_fill_(mask, -std::numeric_limits<double>::infinity());
}

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// One more key (bias_k or the zero key) that no mask hides.
at::Tensor one_more_key(const at::Tensor& mask) {
  return mask.defined() ? at::constant_pad_nd(mask, {0, 1}, 0) : mask;
}

}  // namespace

MultiheadAttentionImpl::MultiheadAttentionImpl(MultiheadAttentionOptions options_) : options(std::move(options_)) {
  TORCH_CHECK_VALUE(options.embed_dim() >= 1, "MultiheadAttention: embed_dim must be a positive integer, got ",
                    options.embed_dim());
  TORCH_CHECK_VALUE(options.num_heads() >= 1, "MultiheadAttention: num_heads must be a positive integer, got ",
                    options.num_heads());
  TORCH_CHECK_VALUE(options.embed_dim() % options.num_heads() == 0, "MultiheadAttention: embed_dim (",
                    options.embed_dim(), ") must be divisible by num_heads (", options.num_heads(), ")");
  TORCH_CHECK_VALUE(options.dropout() >= 0.0 && options.dropout() <= 1.0,
                    "MultiheadAttention: dropout must be a probability in [0, 1], got ", options.dropout());
  for (const auto& [name, size] : {std::pair{"kdim", options.kdim()}, std::pair{"vdim", options.vdim()}}) {
    TORCH_CHECK_VALUE(!size.has_value() || *size >= 1, "MultiheadAttention: ", name,
                      " must be a positive integer, got ", size.value_or(0));
  }
  MultiheadAttentionImpl::reset();
}

void MultiheadAttentionImpl::reset() {
  const int64_t E = options.embed_dim();
  kdim = options.kdim().value_or(E);
  vdim = options.vdim().value_or(E);
  // torch.nn's initialisation: xavier_uniform projections, zero biases, xavier_normal bias_k / bias_v,
  // out_proj as an nn.Linear
  if (kdim == E && vdim == E) {
    in_proj_weight = register_parameter("in_proj_weight", at::empty({3 * E, E}));
    torch::nn::init::xavier_uniform_(in_proj_weight);
  } else {
    q_proj_weight = register_parameter("q_proj_weight", at::empty({E, E}));
    k_proj_weight = register_parameter("k_proj_weight", at::empty({E, kdim}));
    v_proj_weight = register_parameter("v_proj_weight", at::empty({E, vdim}));
    for (auto* weight : {&q_proj_weight, &k_proj_weight, &v_proj_weight}) torch::nn::init::xavier_uniform_(*weight);
  }
  out_proj = register_module("out_proj", Linear(LinearOptions(E, E).bias(options.bias())));
  if (options.bias()) {
    in_proj_bias = register_parameter("in_proj_bias", at::zeros({3 * E}));
    torch::nn::init::zeros_(out_proj->bias);
  }
  if (options.add_bias_kv()) {
    bias_k = register_parameter("bias_k", at::empty({1, 1, E}));
    bias_v = register_parameter("bias_v", at::empty({1, 1, E}));
    torch::nn::init::xavier_normal_(bias_k);
    torch::nn::init::xavier_normal_(bias_v);
  }
}

void MultiheadAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "matterhorn::snn::MultiheadAttention(embed_dim=" << options.embed_dim()
         << ", num_heads=" << options.num_heads() << ", dropout=" << options.dropout() << ", bias=" << std::boolalpha
         << options.bias() << ", add_bias_kv=" << options.add_bias_kv() << ", add_zero_attn="
         << options.add_zero_attn() << ", kdim=" << kdim << ", vdim=" << vdim;
  if (options.batch_first()) stream << ", batch_first=true";
  stream << ")";
}

std::tuple<at::Tensor, at::Tensor> MultiheadAttentionImpl::forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_padding_mask,
    bool need_weights, const at::Tensor& attn_mask, bool average_attn_weights, bool is_causal) {
  const Described layer{options};
  const int64_t E = options.embed_dim(), H = options.num_heads(), head_dim = E / H;
  const int64_t time = options.batch_first() ? 1 : 0;
  const at::Tensor& weight = out_proj->weight;
  // the same checks and messages as the Python class
  for (const auto& [name, x, features] : {std::tuple{"query", &query, E}, std::tuple{"key", &key, kdim},
                                          std::tuple{"value", &value, vdim}}) {
    TORCH_CHECK_VALUE(x->device() == weight.device(), "MultiheadAttention: the ", name, " is on ", x->device(),
                      " but the layer's weight is on ", weight.device(), "; move one of them with .to(device)");
    TORCH_CHECK_TYPE(x->scalar_type() == weight.scalar_type(), "MultiheadAttention: the ", name, "'s dtype ",
                     dtype_name(x->scalar_type()), " does not match the layer's weight dtype ",
                     dtype_name(weight.scalar_type()), "; ",
                     dtype_remedy(x->scalar_type(), weight.scalar_type(), name));
    const char* steps = x == &query ? "T" : "S";
    TORCH_CHECK_VALUE(x->dim() >= 2 && x->size(-1) == features, layer, ": expected the ", name, " [",
                      options.batch_first() ? "B, " : "", steps, options.batch_first() ? ", ..., " : ", B, ..., ",
                      features, "] (or [", steps, ", ", features, "]); got ", x->sizes());
    TORCH_CHECK_VALUE(x->dim() == query.dim(), layer, ": the ", name, " ", x->sizes(),
                      " must have the query's rank (query ", query.sizes(), ")");
    TORCH_CHECK_VALUE(x->dim() == 2 || sequence_sizes(*x, time) == sequence_sizes(query, time), layer, ": the ",
                      name, " ", x->sizes(), " must have the query's batch and extra sizes (query ", query.sizes(),
                      ", time at dimension ", time, ")");
  }
  TORCH_CHECK_VALUE(key.sizes().slice(0, key.dim() - 1) == value.sizes().slice(0, value.dim() - 1), layer,
                    ": key ", key.sizes(), " and value ", value.sizes(), " must have the same sizes but the last");
  for (const auto& [name, mask] :
       {std::pair{"key_padding_mask", &key_padding_mask}, std::pair{"attn_mask", &attn_mask}}) {
    if (!mask->defined()) continue;
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool || mask->is_floating_point(), "MultiheadAttention: ", name,
                     " must be bool or floating point, got ", dtype_name(mask->scalar_type()));
    TORCH_CHECK_VALUE(mask->device() == query.device(), "MultiheadAttention: ", name, " is on ", mask->device(),
                      " but the query is on ", query.device());
  }
  TORCH_CHECK_VALUE(!is_causal || attn_mask.defined(), "MultiheadAttention: is_causal says that attn_mask is the "
                    "causal mask; give attn_mask too (as torch.nn requires)");

  // Fold [T, B, ..., C] into torch.nn's [T, B*N, C]; [T, C] is one sequence, [T, 1, C].
  const bool unbatched = query.dim() == 2;
  const auto time_first = [&](const at::Tensor& x) {
    return options.batch_first() && !unbatched ? x.transpose(0, 1) : x;
  };
  const at::Tensor q_steps = time_first(query);
  const std::vector<int64_t> batch = unbatched ? std::vector<int64_t>{} : sequence_sizes(q_steps, 0);
  const auto fold = [&](const at::Tensor& x) { return unbatched ? x.unsqueeze(1) : x.flatten(1, -2); };
  const at::Tensor q = fold(q_steps);
  const at::Tensor k = key.is_same(query) ? q : fold(time_first(key));
  const at::Tensor v = value.is_same(key) ? k : value.is_same(query) ? q : fold(time_first(value));
  const int64_t T = q.size(0), N = q.size(1), S = k.size(0);

  at::Tensor padding;  // [N, S]
  if (key_padding_mask.defined()) {
    const std::vector<int64_t> sizes = key_padding_mask.sizes().vec();
    if (unbatched) {
      TORCH_CHECK_VALUE(sizes == std::vector<int64_t>{S}, layer, ": expected key_padding_mask [", S,
                        "] for a [T, C] query; got ", key_padding_mask.sizes());
      padding = key_padding_mask.unsqueeze(0);
    } else if (batch.size() > 1 && sizes == std::vector<int64_t>{batch[0], S}) {  // the same for every position
      std::vector<int64_t> view(batch.size() + 1, 1), expanded = batch;
      view.front() = batch[0], view.back() = S;
      expanded.push_back(S);
      padding = key_padding_mask.view(view).expand(expanded).flatten(0, -2);
    } else {
      std::vector<int64_t> expected = batch;
      expected.push_back(S);
      TORCH_CHECK_VALUE(sizes == expected, layer, ": expected key_padding_mask ", c10::IntArrayRef(expected),
                        " ([B, ..., S]) or [", batch[0], ", ", S, "] ([B, S]); got ", key_padding_mask.sizes());
      padding = key_padding_mask.flatten(0, -2);
    }
  }
  at::Tensor mask;  // [T, S] or [N*H, T, S]
  if (attn_mask.defined()) {
    const std::vector<int64_t> sizes = attn_mask.sizes().vec(), square{T, S}, folded{N * H, T, S};
    std::vector<int64_t> per_head = batch;
    per_head.insert(per_head.end(), {H, T, S});
    if (sizes == square || sizes == folded) {
      mask = attn_mask;
    } else {
      TORCH_CHECK_VALUE(!batch.empty() && sizes == per_head, layer, ": expected attn_mask [", T, ", ", S,
                        "] ([T, S]), ", c10::IntArrayRef(per_head), " ([B, ..., heads, T, S]) or [", N * H, ", ", T,
                        ", ", S, "] ([B*N*heads, T, S]); got ", attn_mask.sizes());
      mask = attn_mask.flatten(0, -3);
    }
  }

  // Projections: one GEMM for self-attention, two when key is value, as torch.nn.
  const at::Tensor b = in_proj_bias;
  const auto bias = [&](int64_t index, int64_t count) {
    return b.defined() ? std::optional<at::Tensor>(b.narrow(0, index * E, count * E)) : std::nullopt;
  };
  at::Tensor qp, kp, vp;
  if (in_proj_weight.defined()) {
    const auto w = [&](int64_t index, int64_t count) { return in_proj_weight.narrow(0, index * E, count * E); };
    if (k.is_same(q) && v.is_same(q)) {
      const at::Tensor qkv = at::linear(q, in_proj_weight, optional(b)).unflatten(-1, {3, E});
      qp = qkv.select(-2, 0), kp = qkv.select(-2, 1), vp = qkv.select(-2, 2);
    } else if (v.is_same(k)) {
      qp = at::linear(q, w(0, 1), bias(0, 1));
      const at::Tensor kv = at::linear(k, w(1, 2), bias(1, 2)).unflatten(-1, {2, E});
      kp = kv.select(-2, 0), vp = kv.select(-2, 1);
    } else {
      qp = at::linear(q, w(0, 1), bias(0, 1));
      kp = at::linear(k, w(1, 1), bias(1, 1));
      vp = at::linear(v, w(2, 1), bias(2, 1));
    }
  } else {
    qp = at::linear(q, q_proj_weight, bias(0, 1));
    kp = at::linear(k, k_proj_weight, bias(1, 1));
    vp = at::linear(v, v_proj_weight, bias(2, 1));
  }

  // Masks as one additive [N*H or 1, T, S'] mask; a causal hint alone goes to SDPA as is_causal.
  const at::ScalarType dtype = query.scalar_type();
  padding = additive(padding, dtype);
  bool causal = is_causal;
  if (is_causal && !padding.defined() && !need_weights) {
    mask = at::Tensor();
  } else {
    mask = additive(mask, dtype);
    if (padding.defined()) causal = false;
  }
  if (mask.defined() && mask.dim() == 2) mask = mask.unsqueeze(0);
  if (bias_k.defined()) {
    kp = at::cat({kp, bias_k.repeat({1, N, 1})});
    vp = at::cat({vp, bias_v.repeat({1, N, 1})});
    mask = one_more_key(mask), padding = one_more_key(padding);
  }
  // heads into the batch: [N*H, T or S, head_dim]
  qp = qp.reshape({T, N * H, head_dim}).transpose(0, 1);
  kp = kp.reshape({kp.size(0), N * H, head_dim}).transpose(0, 1);
  vp = vp.reshape({vp.size(0), N * H, head_dim}).transpose(0, 1);
  if (options.add_zero_attn()) {
    kp = at::cat({kp, at::zeros({N * H, 1, head_dim}, kp.options())}, 1);
    vp = at::cat({vp, at::zeros({N * H, 1, head_dim}, vp.options())}, 1);
    mask = one_more_key(mask), padding = one_more_key(padding);
  }
  const int64_t keys = kp.size(1);
  if (padding.defined()) {
    padding = padding.view({N, 1, 1, keys}).expand({-1, H, -1, -1}).reshape({N * H, 1, keys});
    mask = mask.defined() ? mask + padding : padding;
  }
  const double dropout = is_training() ? options.dropout() : 0.0;

  at::Tensor output, weights;
  if (need_weights) {  // the weights themselves: SDPA does not return them
    const at::Tensor scaled = qp * std::sqrt(1.0 / static_cast<double>(head_dim));
    weights = mask.defined() ? at::baddbmm(mask, scaled, kp.transpose(-2, -1)) : at::bmm(scaled, kp.transpose(-2, -1));
    weights = at::softmax(weights, -1);
    if (dropout > 0.0) weights = at::dropout(weights, dropout, true);
    output = at::bmm(weights, vp).transpose(0, 1).reshape({T * N, E});
    weights = weights.view({N, H, T, keys});
    if (average_attn_weights) weights = weights.mean(1);
  } else {
    if (mask.defined()) mask = mask.size(0) == 1 ? mask.unsqueeze(0) : mask.view({N, H, -1, keys});
    output = at::scaled_dot_product_attention(qp.view({N, H, T, head_dim}), kp.view({N, H, keys, head_dim}),
                                              vp.view({N, H, keys, head_dim}), optional(mask), dropout, causal)
                 .permute({2, 0, 1, 3})
                 .reshape({T * N, E});
  }
  output = at::linear(output, weight, optional(out_proj->bias)).view({T, N, E});

  // unfold
  if (unbatched) return {output.squeeze(1), weights.defined() ? weights.squeeze(0) : weights};
  output = output.unflatten(1, batch);
  if (options.batch_first()) output = output.transpose(0, 1);
  if (weights.defined()) weights = weights.unflatten(0, batch);
  return {output, weights};
}

}  // namespace matterhorn::snn
