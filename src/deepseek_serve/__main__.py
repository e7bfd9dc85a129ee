from deepseek_serve.cli import main

main()
