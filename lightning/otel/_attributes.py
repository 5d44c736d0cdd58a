"""Span attribute names: ours (``lightning.*``) and the common ones we read and write.

Written by the exporter (:func:`lightning.otel.instrument`) and read by the OTLP receiver
and the bridge (:class:`lightning.otel.LightningSpanProcessor`). Values are plain OTel
attribute values: strings, bools, ints, doubles and homogeneous arrays of them.

=================================  ==========  ==============================================
attribute                          type        meaning
=================================  ==========  ==============================================
``lightning.rollout.id``           string      rollout id (on every span the exporter writes)
``lightning.rollout.name``         string      rollout name (default: gen_ai.agent.name, span)
``lightning.rollout.group_key``    string      GRPO/RLOO group key
``lightning.rollout.attempt``      int         attempt number
``lightning.rollout.parent_id``    string      enclosing rollout (nested rollouts)
``lightning.rollout.status``       string      completed | failed | cancelled; marks the
                                               span as the rollout's own (its end ends it)
``lightning.delivered``            bool        already sent to the daemon over ZeroMQ: the
                                               receiver skips the rollout (no double count)
``lightning.prompt_token_ids``     int[]       prompt token ids, as the engine saw them
``lightning.response_token_ids``   int[]       sampled response token ids
``lightning.response_logprobs``    double[]    sampler log-prob of each response token
``lightning.policy_version``       int         policy version that sampled the response
``lightning.transition.index``     int         position of the LLM call in its rollout
``lightning.trainable``            bool        false: token ids are not the sampler's own
``lightning.untrainable_reason``   string      why not trainable
``lightning.reward.value``         double      a reward span (emit_reward): primary value
``lightning.reward.name``          string      its name
``lightning.reward.after``         int         transitions recorded before it
``lightning.reward.component.*``   double      named components of a multi-reward
``lightning.reward.final``         double      final reward, on the rollout span
``lightning.span.kind``            string      tool | llm | retrieval | custom ...
``lightning.span.after``           int         transitions recorded before the span ended
``lightning.span.attributes``      string      JSON of the span's own attributes (content)
``lightning.air.rule``             string      AIR step-reward spans (daemon output; never
                                               ingested)
=================================  ==========  ==============================================
"""

from __future__ import annotations

__all__ = [
    "AIR_RULE",
    "DELIVERED",
    "GEN_AI_AGENT_NAME",
    "GEN_AI_EVALUATION_EVENT",
    "GEN_AI_INPUT_MESSAGES",
    "GEN_AI_OPERATION",
    "GEN_AI_OUTPUT_MESSAGES",
    "GEN_AI_PROVIDER",
    "GEN_AI_REQUEST_MAX_TOKENS",
    "GEN_AI_REQUEST_MODEL",
    "GEN_AI_REQUEST_TEMPERATURE",
    "GEN_AI_REQUEST_TOP_P",
    "GEN_AI_RESPONSE_FINISH_REASONS",
    "GEN_AI_RESPONSE_MODEL",
    "GEN_AI_TOOL_ARGUMENTS",
    "GEN_AI_TOOL_CALL_ID",
    "GEN_AI_TOOL_NAME",
    "GEN_AI_TOOL_RESULT",
    "GEN_AI_TOOL_TYPE",
    "GEN_AI_USAGE_INPUT",
    "GEN_AI_USAGE_OUTPUT",
    "LOGPROBS",
    "POLICY_VERSION",
    "PROMPT_IDS",
    "RESPONSE_IDS",
    "REWARD_AFTER",
    "REWARD_COMPONENT",
    "REWARD_FINAL",
    "REWARD_NAME",
    "REWARD_VALUE",
    "ROLLOUT_ATTEMPT",
    "ROLLOUT_GROUP",
    "ROLLOUT_ID",
    "ROLLOUT_NAME",
    "ROLLOUT_PARENT",
    "ROLLOUT_STATUS",
    "SPAN_AFTER",
    "SPAN_ATTRIBUTES",
    "SPAN_KIND",
    "TRAINABLE",
    "TRANSITION_INDEX",
    "UNTRAINABLE_REASON",
]

# ours
ROLLOUT_ID = "lightning.rollout.id"
ROLLOUT_NAME = "lightning.rollout.name"
ROLLOUT_GROUP = "lightning.rollout.group_key"
ROLLOUT_ATTEMPT = "lightning.rollout.attempt"
ROLLOUT_PARENT = "lightning.rollout.parent_id"
ROLLOUT_STATUS = "lightning.rollout.status"
DELIVERED = "lightning.delivered"
PROMPT_IDS = "lightning.prompt_token_ids"
RESPONSE_IDS = "lightning.response_token_ids"
LOGPROBS = "lightning.response_logprobs"
POLICY_VERSION = "lightning.policy_version"
LOGPROB_CONVENTION = "lightning.logprobs.convention"
"""What the span's log-probs are: ``processed`` or ``raw`` (see ``lightning._protocol.Sampling``)."""
TRANSITION_INDEX = "lightning.transition.index"
TRAINABLE = "lightning.trainable"
UNTRAINABLE_REASON = "lightning.untrainable_reason"
REWARD_VALUE = "lightning.reward.value"
REWARD_NAME = "lightning.reward.name"
REWARD_AFTER = "lightning.reward.after"
REWARD_COMPONENT = "lightning.reward.component."
REWARD_FINAL = "lightning.reward.final"
SPAN_KIND = "lightning.span.kind"
SPAN_AFTER = "lightning.span.after"
SPAN_ATTRIBUTES = "lightning.span.attributes"
AIR_RULE = "lightning.air.rule"

# OpenTelemetry GenAI semantic conventions
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT = "gen_ai.usage.output_tokens"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
GEN_AI_TOOL_TYPE = "gen_ai.tool.type"
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"
GEN_AI_TOOL_ARGUMENTS = "gen_ai.tool.call.arguments"
GEN_AI_TOOL_RESULT = "gen_ai.tool.call.result"
GEN_AI_EVALUATION_EVENT = "gen_ai.evaluation.result"
