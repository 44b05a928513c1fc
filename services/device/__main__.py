from services.device.main import main

main()
