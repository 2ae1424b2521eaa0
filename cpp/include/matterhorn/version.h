#pragma once
#include <string>

#include <c10/macros/Export.h>

namespace matterhorn {

// The library's version, e.g. "2.1.0".
C10_EXPORT std::string version();
// The torch release this library was compiled against, e.g. "2.13.0"; it runs only with that minor.
C10_EXPORT std::string torch_version();
// Whether the CUDA kernels were compiled in.
C10_EXPORT bool with_cuda();
// The build of the CPU kernels this process runs: "DEFAULT", "AVX2" or "AVX512" (the best the
// CPU has, lowered by ATEN_CPU_CAPABILITY as torch's own kernels are).
C10_EXPORT std::string cpu_capability();

}  // namespace matterhorn
