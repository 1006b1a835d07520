"""KFP Lightweight Python Components of the irpo-epoch pipeline, one per step.

Each is a thin wrapper over its own module of `llm_auction.pipeline.steps` (imported as `step`,
beside `steps.common`): on the cluster it runs in the project's component image (which has the
package installed, hence `install_kfp_package=False`); locally `kfp.local.SubprocessRunner(
use_venv=False)` runs the same function in this virtual environment. A step imports only its own
module, so the registry steps start without torch or Feast.

The steps that run the policy on GPUs (sampling with vLLM, DPO with DeepSpeed, evaluation with
vLLM) use the CUDA image; the others the CPU image. Both are built from one requirement set
(`infra/`).
"""

COMPONENT_IMAGE = "ghcr.io/llm-auction/component:0.1.0"
COMPONENT_CUDA_IMAGE = "ghcr.io/llm-auction/component-cuda:0.1.0"
