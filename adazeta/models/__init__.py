"""Loading models and their tokenizers, and the family tables."""
