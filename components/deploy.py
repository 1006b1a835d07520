from kfp import dsl

from components import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def deploy(settings_json: str, version: str) -> str:
    """Start the admitted candidate's canary (local record, or its own predictor beside the champion)."""
    import json

    from llm_auction.pipeline.steps import deploy as step

    return json.dumps(step.deploy(settings_json, version))
