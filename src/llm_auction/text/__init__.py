"""The language of the answers: the sentence bank, how to read it (`reading`: topics, bridges, where
an answer puts its ads) and the organic-answer writer a plain LLM stands for.

Public: what any language model of this world knows (topics, products, tips, how people write).
The simulator's hidden truth (which topic an ad was made from, its quality, users' interests) is
not here. The pCTR model must not use this module (an import-linter contract): its text-match
features come from general methods on the texts themselves.
"""
