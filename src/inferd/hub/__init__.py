"""Where models come from: bundled packages, local folders and files, the Hugging Face hub."""
