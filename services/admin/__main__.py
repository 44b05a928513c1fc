from services.admin.main import main

main()
