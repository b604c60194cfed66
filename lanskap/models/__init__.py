"""Base models, shared by caption, train_lora, generate and evaluate: resolve (a hub id, local folder or built-in to
a local diffusers folder with safetensors weights, and the CLIP tokenizer) and folders (what is wrong with a model
folder, said before a loader says something else)."""
