"""Reading handwritten numbers on tally forms: find the boxes, read each digit through the model server,
check the form's arithmetic and send what is uncertain to a person."""
