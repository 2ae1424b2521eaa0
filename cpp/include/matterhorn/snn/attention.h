#pragma once
// matterhorn::snn::MultiheadAttention: the C++ twin of matterhorn_pytorch.snn.MultiheadAttention,
// torch.nn.MultiheadAttention whose sequence is time.
//
//   matterhorn::snn::MultiheadAttention attention(matterhorn::snn::MultiheadAttentionOptions(64, 4));
//   auto [output, weights] = attention(x, x, x);  // [T, B, ..., 64] -> [T, B, ..., 64], [B, ..., T, T]
#include <cstdint>
#include <optional>
#include <ostream>
#include <tuple>

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include "matterhorn/snn/linear.h"

namespace matterhorn::snn {

struct C10_EXPORT MultiheadAttentionOptions {
  MultiheadAttentionOptions(int64_t embed_dim, int64_t num_heads)
      : embed_dim_(embed_dim), num_heads_(num_heads) {}
  TORCH_ARG(int64_t, embed_dim);
  TORCH_ARG(int64_t, num_heads);
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(bool, add_bias_kv) = false;
  TORCH_ARG(bool, add_zero_attn) = false;
  TORCH_ARG(std::optional<int64_t>, kdim) = std::nullopt;  // nullopt: embed_dim
  TORCH_ARG(std::optional<int64_t>, vdim) = std::nullopt;
  TORCH_ARG(bool, batch_first) = false;  // [B, T, ..., C] instead of [T, B, ..., C]
};

// Multi-step only: attention needs the whole sequence, so there is no single-step mode.
class C10_EXPORT MultiheadAttentionImpl : public torch::nn::Cloneable<MultiheadAttentionImpl> {
 public:
  MultiheadAttentionImpl(int64_t embed_dim, int64_t num_heads)
      : MultiheadAttentionImpl(MultiheadAttentionOptions(embed_dim, num_heads)) {}
  explicit MultiheadAttentionImpl(MultiheadAttentionOptions options);

  // Parameters named and initialised as torch.nn.MultiheadAttention's.
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // query [T, B, ..., E], key and value [S, B, ..., kdim / vdim] (time second with batch_first;
  // [T, E] is one sequence). Masks in the input's terms: key_padding_mask [B, ..., S] or [B, S];
  // attn_mask [T, S], [B, ..., heads, T, S] or [B*N*heads, T, S]; bool (true: masked) or additive.
  // Returns the output and the weights [B, ..., T, S] ([B, ..., heads, T, S] without
  // average_attn_weights; undefined without need_weights). is_causal: attn_mask is causal.
  std::tuple<at::Tensor, at::Tensor> forward(
      const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
      const at::Tensor& key_padding_mask = {}, bool need_weights = true, const at::Tensor& attn_mask = {},
      bool average_attn_weights = true, bool is_causal = false);

  MultiheadAttentionOptions options;
  int64_t kdim = 0, vdim = 0;
  // [3E, E] when kdim == vdim == E, else q/k/v_proj_weight [E, E], [E, kdim], [E, vdim]
  at::Tensor in_proj_weight, q_proj_weight, k_proj_weight, v_proj_weight;
  at::Tensor in_proj_bias;    // [3E], undefined without bias
  at::Tensor bias_k, bias_v;  // [1, 1, E] with add_bias_kv
  Linear out_proj = nullptr;  // E -> E
};

TORCH_MODULE(MultiheadAttention);

}  // namespace matterhorn::snn
