"""Images and videos: safe path resolution, opt-in remote fetching, header-only sizes and frame facts (what
accounting needs without decoding), and decoding exactly what the processor will see."""
