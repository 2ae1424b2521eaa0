#pragma once
// Everything of the public C++ API.
#include "matterhorn/ops/linear.h"
#include "matterhorn/ops/batch_norm.h"
#include "matterhorn/ops/conv.h"
#include "matterhorn/ops/layer_norm.h"
#include "matterhorn/ops/weight_standardize.h"
#include "matterhorn/snn/conv.h"
#include "matterhorn/snn/fuse.h"
#include "matterhorn/snn/linear.h"
#include "matterhorn/snn/normalization.h"
#include "matterhorn/snn/step_mode.h"
#include "matterhorn/serialize.h"
#include "matterhorn/version.h"
