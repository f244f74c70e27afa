"""The tokenizer of this checkpoint: tokenizer.json as it is (written by dlmjax).

tokenizer_config.json names this class in auto_map so that AutoTokenizer reads tokenizer.json
as it is instead of rebuilding a pipeline for config.json's model_type."""

from transformers import PreTrainedTokenizerFast


class TokenizerJsonAsIs(PreTrainedTokenizerFast):
    """transformers' generic fast tokenizer: tokenizer.json's normalizer, pre-tokenizer, model and decoder."""
