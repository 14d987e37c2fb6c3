from avstrain.cli import main

main()
