"""Text front end: normalisation, long-text splitting, hybrid phoneme+text, tokenizer."""
