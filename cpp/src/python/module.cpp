// matterhorn_pytorch._C: build information and the C++ modules, for parity tests.
// Tensor compute is never routed through here: the ops live in the dispatcher (torch.ops.matterhorn).
#include <sstream>
#include <tuple>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/enum.h>

#include "matterhorn/ops/conv.h"
#include "matterhorn/snn/attention.h"
#include "matterhorn/snn/conv.h"
#include "matterhorn/snn/fuse.h"
#include "matterhorn/snn/linear.h"
#include "matterhorn/snn/normalization.h"
#include "matterhorn/snn/weight_standardization.h"
#include "matterhorn/version.h"
#include "ops/checks.h"
#include "python/dlpack_capsule.h"

namespace py = pybind11;

namespace matterhorn::python {
namespace {

template <typename Items>
py::dict capsules(const Items& items) {
  py::dict result;
  for (const auto& item : items) result[py::str(item.key())] = tensor_to_capsule(item.value().detach());
  return result;
}

// Tensor-valued methods shared by every bound C++ module: parameters and buffers in and out, forward
// (one tensor in and out; a module with another forward binds its own).
template <typename ModuleHolder, typename PyClass, bool one_tensor_forward = true>
void bind_module_tensors(PyClass& cls) {
  if constexpr (one_tensor_forward) {
    cls.def("forward", [](ModuleHolder& self, const py::capsule& input) {
      return tensor_to_capsule(self->forward(tensor_from_capsule(input)));
    });
  }
  cls.def("named_parameters", [](ModuleHolder& self) { return capsules(self->named_parameters()); })
      .def("named_buffers", [](ModuleHolder& self) { return capsules(self->named_buffers()); })
      .def("load_parameters", [](ModuleHolder& self, const py::dict& tensors) {
        // Copies each given tensor into the parameter or buffer of that name, as load_state_dict:
        // unknown names, other shapes and other dtypes are errors (copy_ would broadcast and cast).
        const c10::NoGradGuard no_grad;
        auto params = self->named_parameters();
        auto buffers = self->named_buffers();
        for (const auto& item : tensors) {
          const std::string name = py::cast<std::string>(item.first);
          at::Tensor* target = params.find(name);
          if (target == nullptr) target = buffers.find(name);
          if (target == nullptr) throw py::key_error("no parameter or buffer named '" + name + "'");
          const at::Tensor source = tensor_from_capsule(py::reinterpret_borrow<py::capsule>(item.second));
          TORCH_CHECK_VALUE(
              source.sizes() == target->sizes() && source.scalar_type() == target->scalar_type(), "load_parameters: '",
              name, "' of ", self->name(), " is ", matterhorn::ops::detail::dtype_name(target->scalar_type()), " ",
              target->sizes(), ", got ", matterhorn::ops::detail::dtype_name(source.scalar_type()), " ", source.sizes());
          target->copy_(source);
        }
      })
      .def("train", [](ModuleHolder& self, bool on) { self->train(on); }, py::arg("mode") = true)
      .def("__repr__", [](ModuleHolder& self) {
        std::ostringstream stream;
        self->pretty_print(stream);
        return stream.str();
      });
}

// Binds `make` (the Python class's arguments, in its order -> the layer's options) as Holder's constructor;
// `arguments` describes them (py::arg with defaults, py::kw_only()).
template <typename Holder, typename Options, typename... Types, typename... Arguments>
void bind_init(py::class_<Holder>& cls, Options (*make)(Types...), const std::tuple<Arguments...>& arguments) {
  std::apply(
      [&](const auto&... described) {
        cls.def(py::init([make](Types... values) { return Holder(make(values...)); }), described...);
      },
      arguments);
}

// A synapse (Linear, ConvNd, ConvTransposeNd and their WS twins): `make` and `positional` as for
// bind_init, then a WS layer's affine and eps, then keyword-only spike_input, as the Python classes.
template <typename Holder, typename Options, typename... Types, typename... Arguments>
void bind_synapse(py::class_<Holder>& cls, Options (*make)(Types...), const std::tuple<Arguments...>& positional) {
  std::apply(
      [&](const auto&... described) {
        if constexpr (requires(Options o) { o.affine(true).eps(0.0); }) {
          cls.def(py::init([make](Types... values, bool affine, double eps, bool spike_input) {
                    return Holder(make(values...).affine(affine).eps(eps).spike_input(spike_input));
                  }),
                  described..., py::arg("affine") = true, py::arg("eps") = 1e-6, py::kw_only(),
                  py::arg("spike_input") = false);
        } else {
          cls.def(py::init([make](Types... values, bool spike_input) {
                    return Holder(make(values...).spike_input(spike_input));
                  }),
                  described..., py::kw_only(), py::arg("spike_input") = false);
        }
      },
      positional);
  bind_module_tensors<Holder>(cls);
}

// One size for every spatial dimension, or D of them; `layer` and `what` name them in the error.
template <size_t D>
torch::ExpandingArray<D> sizes(const std::vector<int64_t>& values, const std::string& layer, const char* what) {
  TORCH_CHECK_VALUE(
      values.size() == 1 || values.size() == D, layer, ": ", what, " must hold ",
      D == 1 ? std::string("1 value") : c10::str("1 or ", D, " values"), ", got ", c10::IntArrayRef(values));
  if (values.size() == 1) return torch::ExpandingArray<D>(values[0]);
  return torch::ExpandingArray<D>(values);
}

torch::nn::detail::conv_padding_mode_t padding_mode(const std::string& name) {
  if (name == "zeros") return torch::kZeros;
  if (name == "reflect") return torch::kReflect;
  if (name == "replicate") return torch::kReplicate;
  if (name == "circular") return torch::kCircular;
  throw py::value_error("padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', got '" + name + "'");
}

snn::StepMode step_mode(bool multi_time_step) {
  return multi_time_step ? snn::StepMode::kMulti : snn::StepMode::kSingle;
}

using ConvPadding = std::variant<std::string, std::vector<int64_t>>;

// ConvOptions<D> or WSConvOptions<D> from the Python class's arguments (sizes as lists; padding a
// list or 'same' / 'valid').
template <typename Options, size_t D>
Options conv_options(
    int64_t in_channels, int64_t out_channels, const std::vector<int64_t>& kernel_size,
    const std::vector<int64_t>& stride, const ConvPadding& padding, const std::vector<int64_t>& dilation,
    int64_t groups, bool bias, const std::string& mode) {
  const std::string layer = c10::str(requires(Options o) { o.affine(true); } ? "WSConv" : "Conv", D, "d");
  Options options(in_channels, out_channels, sizes<D>(kernel_size, layer, "kernel_size"));
  options.stride(sizes<D>(stride, layer, "stride")).dilation(sizes<D>(dilation, layer, "dilation"));
  options.groups(groups).bias(bias);
  options.padding_mode(padding_mode(mode));
  if (const auto* text = std::get_if<std::string>(&padding)) {
    if (*text == "same") {
      options.padding(torch::kSame);
    } else if (*text == "valid") {
      options.padding(torch::kValid);
    } else {
      throw py::value_error("padding must be 'same', 'valid' or sizes, got '" + *text + "'");
    }
  } else {
    options.padding(sizes<D>(std::get<std::vector<int64_t>>(padding), layer, "padding"));
  }
  return options;
}

// Conv1d/2d/3d and WSConv1d/2d/3d with the Python classes' arguments.
template <typename Holder, size_t D>
void bind_conv(py::module_& m, const char* name) {
  py::class_<Holder> cls(m, name);
  bind_synapse(
      cls, &conv_options<decltype(Holder::ContainedType::options), D>,
      std::make_tuple(py::arg("in_channels"), py::arg("out_channels"), py::arg("kernel_size"),
                      py::arg("stride") = std::vector<int64_t>{1}, py::arg("padding") = std::vector<int64_t>{0},
                      py::arg("dilation") = std::vector<int64_t>{1}, py::arg("groups") = 1, py::arg("bias") = true,
                      py::arg("padding_mode") = "zeros"));
}

template <typename Options>
Options linear_options(int64_t in_features, int64_t out_features, bool bias) {
  return Options(in_features, out_features).bias(bias);
}

// Linear and WSLinear.
template <typename Holder>
void bind_linear(py::module_& m, const char* name) {
  py::class_<Holder> cls(m, name);
  bind_synapse(
      cls, &linear_options<decltype(Holder::ContainedType::options)>,
      std::make_tuple(py::arg("in_features"), py::arg("out_features"), py::arg("bias") = true));
}

template <size_t D>
snn::ConvTransposeOptions<D> conv_transpose_options(
    int64_t in_channels, int64_t out_channels, const std::vector<int64_t>& kernel_size,
    const std::vector<int64_t>& stride, const std::vector<int64_t>& padding, const std::vector<int64_t>& output_padding,
    int64_t groups, bool bias, const std::vector<int64_t>& dilation) {
  const std::string layer = c10::str("ConvTranspose", D, "d");
  snn::ConvTransposeOptions<D> options(in_channels, out_channels, sizes<D>(kernel_size, layer, "kernel_size"));
  options.stride(sizes<D>(stride, layer, "stride")).padding(sizes<D>(padding, layer, "padding"));
  options.output_padding(sizes<D>(output_padding, layer, "output_padding"));
  options.groups(groups).bias(bias).dilation(sizes<D>(dilation, layer, "dilation"));
  return options;
}

template <typename Holder, size_t D>
void bind_conv_transpose(py::module_& m, const char* name) {
  py::class_<Holder> cls(m, name);
  bind_synapse(
      cls, &conv_transpose_options<D>,
      std::make_tuple(py::arg("in_channels"), py::arg("out_channels"), py::arg("kernel_size"),
                      py::arg("stride") = std::vector<int64_t>{1}, py::arg("padding") = std::vector<int64_t>{0},
                      py::arg("output_padding") = std::vector<int64_t>{0}, py::arg("groups") = 1,
                      py::arg("bias") = true, py::arg("dilation") = std::vector<int64_t>{1}));
  cls.def("forward", [](Holder& self, const py::capsule& input, const std::vector<int64_t>& output_size) {
    return tensor_to_capsule(self->forward(tensor_from_capsule(input), output_size));
  });
}

// BatchNorm's arguments after num_features, which the temporal norms share.
auto norm_arguments() {
  return std::make_tuple(py::arg("eps") = 1e-5, py::arg("momentum") = 0.1, py::arg("affine") = true,
                         py::arg("track_running_stats") = true, py::kw_only());
}

snn::BatchNormOptions batch_norm_options(
    int64_t num_features, double eps, std::optional<double> momentum, bool affine, bool track_running_stats, bool bias,
    bool multi_time_step, bool batch_first, bool per_step) {
  return snn::BatchNormOptions(num_features)
      .eps(eps)
      .momentum(momentum)
      .affine(affine)
      .track_running_stats(track_running_stats)
      .bias(bias)
      .step_mode(step_mode(multi_time_step))
      .batch_first(batch_first)
      .per_step(per_step);
}

template <typename Holder>
void bind_batch_norm(py::module_& m, const char* name) {
  py::class_<Holder> cls(m, name);
  bind_init(cls, &batch_norm_options,
            std::tuple_cat(std::make_tuple(py::arg("num_features")), norm_arguments(),
                           std::make_tuple(py::arg("bias") = true, py::arg("multi_time_step") = true,
                                           py::arg("batch_first") = false, py::arg("per_step") = false)));
  bind_module_tensors<Holder>(cls);
}

snn::TemporalBatchNormOptions temporal_norm_options(
    int64_t T, int64_t num_features, double eps, std::optional<double> momentum, bool affine, bool track_running_stats,
    bool batch_first) {
  return snn::TemporalBatchNormOptions(T, num_features)
      .eps(eps)
      .momentum(momentum)
      .affine(affine)
      .track_running_stats(track_running_stats)
      .batch_first(batch_first);
}

snn::TemporalBatchNormOptions threshold_dependent_options(
    double alpha, double v_th, int64_t num_features, double eps, std::optional<double> momentum, bool affine,
    bool track_running_stats, bool batch_first) {
  return temporal_norm_options(1, num_features, eps, momentum, affine, track_running_stats, batch_first)
      .alpha(alpha)
      .v_th(v_th);
}

// The temporal normalizations: (alpha, v_th, num_features, ...) for tdBN, (T, num_features, ...) else.
template <typename Holder, snn::TemporalNorm K>
void bind_temporal_norm(py::module_& m, const char* name) {
  py::class_<Holder> cls(m, name);
  const auto rest = std::tuple_cat(norm_arguments(), std::make_tuple(py::arg("batch_first") = false));
  if constexpr (K == snn::TemporalNorm::kThresholdDependent) {
    bind_init(cls, &threshold_dependent_options,
              std::tuple_cat(std::make_tuple(py::arg("alpha"), py::arg("v_th"), py::arg("num_features")), rest));
  } else {
    bind_init(cls, &temporal_norm_options, std::tuple_cat(std::make_tuple(py::arg("T"), py::arg("num_features")), rest));
  }
  bind_module_tensors<Holder>(cls);
}

// A Sequential of bound modules, for the fuse parity test.
template <typename... Holders>
torch::nn::Sequential sequential_of(const py::list& items) {
  torch::nn::Sequential result;
  for (const py::handle item : items) {
    const bool pushed =
        ((py::isinstance<Holders>(item) && (result->push_back(torch::nn::AnyModule(item.cast<Holders>())), true)) || ...);
    if (!pushed) throw py::type_error("Sequential: expected bound matterhorn modules, got " + py::str(item.get_type()).cast<std::string>());
  }
  return result;
}

void bind_sequential(py::module_& m) {
  auto cls = py::class_<torch::nn::Sequential>(m, "Sequential");
  cls.def(py::init([](const py::list& items) {
    return sequential_of<snn::Linear, snn::Conv1d, snn::Conv2d, snn::Conv3d, snn::ConvTranspose1d, snn::ConvTranspose2d,
                         snn::ConvTranspose3d, snn::BatchNorm1d, snn::BatchNorm2d, snn::BatchNorm3d,
                         snn::ThresholdDependentBatchNorm1d, snn::ThresholdDependentBatchNorm2d,
                         snn::ThresholdDependentBatchNorm3d, snn::TemporalEffectiveBatchNorm2d,
                         snn::BatchNormThroughTime2d, snn::LayerNorm>(items);
  }));
  bind_module_tensors<torch::nn::Sequential>(cls);
  cls.def("fuse", [](const torch::nn::Sequential& self) { return snn::fuse(self); }, "matterhorn::snn::fuse");
}

}  // namespace
}  // namespace matterhorn::python

PYBIND11_MODULE(_C, m) {
  using namespace matterhorn;
  m.doc() = "C++ core of matterhorn_pytorch: build information and C++ modules for parity tests";
  // C++ checks raise c10::ValueError / c10::TypeError: keep their Python classes across pybind11.
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });

  m.def("build_info", [] {
    py::dict info;
    info["version"] = version();
    info["torch_version"] = torch_version();
    info["with_cuda"] = with_cuda();
    return info;
  });

  m.def("cpu_capability", &cpu_capability, "the build of the CPU kernels this process runs: DEFAULT, AVX2 or AVX512");

  m.def(
      "same_padding",
      [](const std::vector<int64_t>& kernel_size, const std::vector<int64_t>& dilation) {
        return ops::same_padding(kernel_size, dilation);
      },
      py::arg("kernel_size"), py::arg("dilation"),
      "padding='same' as (before, after) pairs per spatial dimension");

  py::enum_<snn::StepMode>(m, "StepMode")
      .value("SINGLE", snn::StepMode::kSingle)
      .value("MULTI", snn::StepMode::kMulti);

  python::bind_linear<snn::Linear>(m, "Linear");

  python::bind_conv<snn::Conv1d, 1>(m, "Conv1d");
  python::bind_conv<snn::Conv2d, 2>(m, "Conv2d");
  python::bind_conv<snn::Conv3d, 3>(m, "Conv3d");
  python::bind_conv<snn::WSConv1d, 1>(m, "WSConv1d");
  python::bind_conv<snn::WSConv2d, 2>(m, "WSConv2d");
  python::bind_conv<snn::WSConv3d, 3>(m, "WSConv3d");
  python::bind_linear<snn::WSLinear>(m, "WSLinear");
  python::bind_conv_transpose<snn::ConvTranspose1d, 1>(m, "ConvTranspose1d");
  python::bind_conv_transpose<snn::ConvTranspose2d, 2>(m, "ConvTranspose2d");
  python::bind_conv_transpose<snn::ConvTranspose3d, 3>(m, "ConvTranspose3d");

  python::bind_batch_norm<snn::BatchNorm1d>(m, "BatchNorm1d");
  python::bind_batch_norm<snn::BatchNorm2d>(m, "BatchNorm2d");
  python::bind_batch_norm<snn::BatchNorm3d>(m, "BatchNorm3d");
  python::bind_temporal_norm<snn::ThresholdDependentBatchNorm1d, snn::TemporalNorm::kThresholdDependent>(
      m, "ThresholdDependentBatchNorm1d");
  python::bind_temporal_norm<snn::ThresholdDependentBatchNorm2d, snn::TemporalNorm::kThresholdDependent>(
      m, "ThresholdDependentBatchNorm2d");
  python::bind_temporal_norm<snn::ThresholdDependentBatchNorm3d, snn::TemporalNorm::kThresholdDependent>(
      m, "ThresholdDependentBatchNorm3d");
  python::bind_temporal_norm<snn::TemporalEffectiveBatchNorm1d, snn::TemporalNorm::kTemporalEffective>(
      m, "TemporalEffectiveBatchNorm1d");
  python::bind_temporal_norm<snn::TemporalEffectiveBatchNorm2d, snn::TemporalNorm::kTemporalEffective>(
      m, "TemporalEffectiveBatchNorm2d");
  python::bind_temporal_norm<snn::TemporalEffectiveBatchNorm3d, snn::TemporalNorm::kTemporalEffective>(
      m, "TemporalEffectiveBatchNorm3d");
  python::bind_temporal_norm<snn::BatchNormThroughTime1d, snn::TemporalNorm::kThroughTime>(m, "BatchNormThroughTime1d");
  python::bind_temporal_norm<snn::BatchNormThroughTime2d, snn::TemporalNorm::kThroughTime>(m, "BatchNormThroughTime2d");
  python::bind_temporal_norm<snn::BatchNormThroughTime3d, snn::TemporalNorm::kThroughTime>(m, "BatchNormThroughTime3d");
  auto layer_norm = py::class_<snn::LayerNorm>(m, "LayerNorm");
  layer_norm.def(
      py::init([](const std::vector<int64_t>& normalized_shape, double eps, bool elementwise_affine, bool bias) {
        return snn::LayerNorm(
            snn::LayerNormOptions(normalized_shape).eps(eps).elementwise_affine(elementwise_affine).bias(bias));
      }),
      py::arg("normalized_shape"), py::arg("eps") = 1e-5, py::arg("elementwise_affine") = true,
      py::arg("bias") = true);
  python::bind_module_tensors<snn::LayerNorm>(layer_norm);

  auto attention = py::class_<snn::MultiheadAttention>(m, "MultiheadAttention");
  attention.def(
      py::init([](int64_t embed_dim, int64_t num_heads, double dropout, bool bias, bool add_bias_kv,
                  bool add_zero_attn, std::optional<int64_t> kdim, std::optional<int64_t> vdim, bool batch_first) {
        return snn::MultiheadAttention(snn::MultiheadAttentionOptions(embed_dim, num_heads)
                                           .dropout(dropout)
                                           .bias(bias)
                                           .add_bias_kv(add_bias_kv)
                                           .add_zero_attn(add_zero_attn)
                                           .kdim(kdim)
                                           .vdim(vdim)
                                           .batch_first(batch_first));
      }),
      py::arg("embed_dim"), py::arg("num_heads"), py::arg("dropout") = 0.0, py::arg("bias") = true,
      py::arg("add_bias_kv") = false, py::arg("add_zero_attn") = false, py::arg("kdim") = py::none(),
      py::arg("vdim") = py::none(), py::arg("batch_first") = false);
  python::bind_module_tensors<snn::MultiheadAttention, decltype(attention), false>(attention);
  // A capsule is consumed once: key None is the query itself, value None the key (self-attention).
  attention.def(
      "forward",
      [](snn::MultiheadAttention& self, const py::capsule& query, const std::optional<py::capsule>& key,
         const std::optional<py::capsule>& value, const std::optional<py::capsule>& key_padding_mask,
         bool need_weights, const std::optional<py::capsule>& attn_mask, bool average_attn_weights, bool is_causal) {
        const auto tensor = [](const std::optional<py::capsule>& c) {
          return c ? python::tensor_from_capsule(*c) : at::Tensor();
        };
        const at::Tensor q = python::tensor_from_capsule(query);
        const at::Tensor k = key ? tensor(key) : q;
        const at::Tensor v = value ? tensor(value) : k;
        auto [output, weights] = self->forward(q, k, v, tensor(key_padding_mask), need_weights, tensor(attn_mask),
                                               average_attn_weights, is_causal);
        return py::make_tuple(python::tensor_to_capsule(output),
                              weights.defined() ? py::object(python::tensor_to_capsule(weights)) : py::none());
      },
      py::arg("query"), py::arg("key") = py::none(), py::arg("value") = py::none(),
      py::arg("key_padding_mask") = py::none(), py::arg("need_weights") = true, py::arg("attn_mask") = py::none(),
      py::arg("average_attn_weights") = true, py::arg("is_causal") = false);
  python::bind_sequential(m);
}
