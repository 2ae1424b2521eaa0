#pragma once
#include <torch/nn/modules/container/sequential.h>

namespace matterhorn::snn {

// A copy of `model` for inference in which each BatchNorm1d/2d/3d or ThresholdDependentBatchNorm1d/2d/3d
// (tdBN: a BatchNorm initialised differently) that directly follows a Linear,
// Conv1d/2d/3d or ConvTranspose1d/2d/3d (all matterhorn::snn modules) with as many output
// channels as the BatchNorm has features is folded into that layer's weight and bias (computed
// in float64, cast to the weight's dtype); the BatchNorm's place holds a torch::nn::Identity, so
// every other module keeps its name (and the state_dict keys are those of Python's mth.fuse).
// Every other module is cloned (a torch::nn::Sequential cannot hold a Sequential, so there is no
// nesting to walk). `model` must be in eval mode
// (c10::ValueError otherwise), as must a BatchNorm to fold have running statistics
// (track_running_stats=false normalises with batch statistics: c10::ValueError). `model` is not
// changed.
torch::nn::Sequential fuse(const torch::nn::Sequential& model);

}  // namespace matterhorn::snn
