#pragma once
// Time-step modes shared by every layer: multi-step input is [T, B, ...] ([B, T, ...] with
// batch_first), single-step input is [B, ...].
#include <ostream>

namespace matterhorn::snn {

enum class StepMode { kSingle, kMulti };

inline std::ostream& operator<<(std::ostream& stream, StepMode mode) {
  return stream << (mode == StepMode::kMulti ? "'m'" : "'s'");
}

}  // namespace matterhorn::snn
