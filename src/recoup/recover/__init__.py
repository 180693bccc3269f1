"""Recovery: hard prompts, soft prompts (Compress-Then-Prompt), IDP pools, LoRA and CPET."""
