"""The policy LLM: prompt and response format, model and tokenizer, warm start, generation."""
