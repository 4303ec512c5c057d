"""The thin part that calls vLLM (imported only when --backend vllm is used)."""

from __future__ import annotations


def make_llm(kwargs: dict):
    from vllm import LLM

    return LLM(**kwargs)


def sampling_params(fields: dict):
    from vllm import SamplingParams

    fields = dict(fields)
    guided = fields.pop("guided")
    if guided:
        try:  # vLLM <= 0.11
            from vllm.sampling_params import GuidedDecodingParams

            fields["guided_decoding"] = GuidedDecodingParams(**guided)
        except ImportError:  # later releases renamed it
            from vllm.sampling_params import StructuredOutputsParams

            fields["structured_outputs"] = StructuredOutputsParams(**guided)
    return SamplingParams(**fields)


def generate(llm, prompts: list[dict], params: list, adapter: str | None = None) -> list[str]:
    lora_request = None
    if adapter:
        from vllm.lora.request import LoRARequest

        lora_request = LoRARequest("adapter", 1, adapter)
    outputs = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
    return [out.outputs[0].text for out in outputs]
