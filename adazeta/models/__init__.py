"""Loading models and their tokenizers (hub, local folder, packaged, random weights), and the packaged SmolLM2-135M converted once."""
