"""Generate text with a GLM-4.5 (glm4_moe) model. Runs on the bundled demo with no arguments."""

from mlx_glm4moe.cli import generate_main as main

if __name__ == "__main__":
    main()
