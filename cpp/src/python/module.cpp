// matterhorn_pytorch._C: build information and the C++ modules, for parity tests.
// Tensor compute is never routed through here: the ops live in the dispatcher (torch.ops.matterhorn).
#include <sstream>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "matterhorn/ops/conv.h"
#include "matterhorn/snn/linear.h"
#include "matterhorn/version.h"
#include "python/dlpack_capsule.h"

namespace py = pybind11;

namespace matterhorn::python {
namespace {

// Tensor-valued methods shared by every bound C++ module: parameters in and out, forward.
template <typename ModuleHolder, typename PyClass>
void bind_module_tensors(PyClass& cls) {
  cls.def("forward", [](ModuleHolder& self, const py::capsule& input) {
       return tensor_to_capsule(self->forward(tensor_from_capsule(input)));
     })
      .def("named_parameters", [](ModuleHolder& self) {
        py::dict result;
        for (const auto& item : self->named_parameters()) {
          result[py::str(item.key())] = tensor_to_capsule(item.value().detach());
        }
        return result;
      })
      .def("load_parameters", [](ModuleHolder& self, const py::dict& tensors) {
        // Copies each given tensor into the parameter of that name; unknown names are errors.
        const c10::NoGradGuard no_grad;
        auto params = self->named_parameters();
        for (const auto& item : tensors) {
          const std::string name = py::cast<std::string>(item.first);
          at::Tensor* param = params.find(name);
          if (param == nullptr) throw py::key_error("no parameter named '" + name + "'");
          param->copy_(tensor_from_capsule(py::reinterpret_borrow<py::capsule>(item.second)));
        }
      })
      .def("train", [](ModuleHolder& self, bool on) { self->train(on); }, py::arg("mode") = true)
      .def("__repr__", [](ModuleHolder& self) {
        std::ostringstream stream;
        self->pretty_print(stream);
        return stream.str();
      });
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

  auto linear = py::class_<snn::Linear>(m, "Linear");
  linear.def(
      py::init([](int64_t in_features, int64_t out_features, bool bias, bool multi_time_step,
                  bool batch_first) {
        return snn::Linear(snn::LinearOptions(in_features, out_features)
                               .bias(bias)
                               .step_mode(multi_time_step ? snn::StepMode::kMulti : snn::StepMode::kSingle)
                               .batch_first(batch_first));
      }),
      py::arg("in_features"), py::arg("out_features"), py::arg("bias") = true, py::kw_only(),
      py::arg("multi_time_step") = true, py::arg("batch_first") = false);
  python::bind_module_tensors<snn::Linear>(linear);
}
