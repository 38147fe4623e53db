"""Convert a GLM-4.5 (glm4_moe) Hugging Face checkpoint to MLX. See `--help`."""

from mlx_glm4moe.cli import convert_main as main

if __name__ == "__main__":
    main()
