from sdxs.model_folder.write import main

main()
